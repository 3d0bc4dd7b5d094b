"""What a search did, per generation, read from its events: execution rate and failure
reasons, hyper-parameter vs algorithmic ideas, diversity, best and mean score.

One library for both readers: `groundloop analyze` (the CLI writes analysis.md and plots) and
the API (`GET /searches/{id}/analysis`, the dashboard's analysis panels) compute the same
numbers with the same functions.

    analyze.py       analyze_events(events, …) -> dict (plain JSON values)
    from_log.py      analyze_logged(bus, settings, search_id, …): read the log, the large
                     diffs and the installed environment, then analyze_events
    diversity.py     similarity measures (WordLlama with the [analysis] extra, else TF-IDF)
    idea_classes.py  hyper-parameter vs algorithmic, from the patch
    idea_judge.py    the same by an LLM judge (needs the [llm] extra)
"""
