"""`python -m groundloop.cli ARGS` is the `groundloop` command (for images and checkouts
without the console script on PATH)."""

from groundloop.cli.main import main

if __name__ == "__main__":
    main()
