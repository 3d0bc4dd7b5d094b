"""tinygpt data (protected): the byte corpus, its fixed splits and the training-token budget.

Consumes: the running interpreter's standard library (a fixed list of source files, read in
place, never copied into the repository), or any text file named by
GROUNDLOOP_TINYGPT_CORPUS. Emits: byte tensors for the train / val / test splits and a batch
iterator that stops once the token budget is spent.

The corpus bytes depend on the Python version (the stdlib changes between releases), so every
run records `corpus_sha256`; compare runs only when it matches. The built corpus is cached
under GROUNDLOOP_CACHE_DIR when that is set.

The budget: TOKEN_BUDGET training tokens (batch_size * block_size per batch), shared by every
batch iterator in the process. Smoke runs (GROUNDLOOP_SMOKE=1 or train.py --smoke) get
SMOKE_TOKENS. GROUNDLOOP_TINYGPT_TOKENS can only lower the budget, for running the commands by
hand (the runner's sandbox does not pass it through). Under the protected budget_guard.py (the
manifest's entrypoint) the budget is counted and cut in the guard's process, not here: the
guard calls `serve` and training reads its batches from GROUNDLOOP_DATA_FD, and the corpus
files (`unreadable_paths`) are unreadable to training (Landlock), so resetting or patching
this module, opening a second iterator or reading the corpus itself buys no extra token.
Without the guard (a hand run) the in-process counter below is the only limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

TOKEN_BUDGET = 524_288  # training tokens per run (256 steps of 16 x 128)
SMOKE_TOKENS = 32_768  # 16 steps at the default batch shape
VOCAB_SIZE = 256  # bytes
EVAL_TOKENS = 65_536  # tokens scored by evaluate.py on the chosen split
SMOKE_EVAL_TOKENS = 4_096
CHUNK = 4096  # splits interleave 4 KiB chunks, so val/test match the train distribution
VAL_CHUNK, TEST_CHUNK, CHUNK_PERIOD = 7, 13, 20  # chunk i is val if i % 20 == 7, test if 13

# Pure-Python stdlib modules present, as plain files, in CPython 3.11, 3.12 and 3.13.
STDLIB_FILES = tuple(
    """
    argparse.py ast.py base64.py bdb.py bisect.py calendar.py cmd.py code.py codecs.py
    collections/__init__.py configparser.py contextlib.py copy.py csv.py dataclasses.py
    difflib.py dis.py doctest.py enum.py filecmp.py fileinput.py fnmatch.py fractions.py
    ftplib.py functools.py gettext.py getopt.py glob.py graphlib.py gzip.py hashlib.py heapq.py
    html/parser.py http/client.py imaplib.py inspect.py ipaddress.py json/decoder.py
    json/encoder.py linecache.py locale.py logging/__init__.py mailbox.py mimetypes.py
    modulefinder.py netrc.py ntpath.py numbers.py optparse.py os.py pdb.py pickle.py
    platform.py plistlib.py poplib.py posixpath.py pprint.py pydoc.py queue.py quopri.py
    random.py reprlib.py runpy.py sched.py selectors.py shlex.py shutil.py smtplib.py socket.py
    statistics.py string.py stringprep.py subprocess.py tabnanny.py tarfile.py tempfile.py
    textwrap.py threading.py timeit.py tokenize.py trace.py traceback.py tracemalloc.py
    typing.py unittest/case.py urllib/parse.py uuid.py warnings.py weakref.py webbrowser.py
    zipimport.py _pydecimal.py
    """.split()
)
MIN_CORPUS_BYTES = 1_000_000

# Tokens handed out so far in this process: every iterator draws on one budget, so making a
# second iterator does not buy a second budget.
_tokens_served = 0


def smoke_mode() -> bool:
    return os.environ.get("GROUNDLOOP_SMOKE") == "1"


def token_budget(smoke: bool = False) -> int:
    """Training tokens this run may consume; an override can only lower it."""
    budget = SMOKE_TOKENS if smoke or smoke_mode() else TOKEN_BUDGET
    override = os.environ.get("GROUNDLOOP_TINYGPT_TOKENS")
    if override:
        budget = min(budget, int(override))
    return budget


def _build_stdlib_corpus() -> tuple[bytes, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, missing = [], []
    for name in STDLIB_FILES:
        path = stdlib / name
        if path.is_file():
            parts.append(f"# ===== {name} =====\n".encode() + path.read_bytes())
        else:
            missing.append(name)
    corpus = b"\n".join(parts)
    if len(corpus) < MIN_CORPUS_BYTES:
        raise RuntimeError(
            f"the standard library at {stdlib} lacks too many source files ({len(missing)} of "
            f"{len(STDLIB_FILES)} missing, e.g. {missing[:3]}); install the full Python stdlib "
            "or set GROUNDLOOP_TINYGPT_CORPUS=/path/to/a/text/file"
        )
    source = f"stdlib:{stdlib}"
    return corpus, source


def load_corpus() -> tuple[bytes, dict[str, str]]:
    """The corpus bytes and their provenance: source, sha256, size."""
    custom = os.environ.get("GROUNDLOOP_TINYGPT_CORPUS")
    if custom:
        path = Path(custom)
        if not path.is_file():
            raise FileNotFoundError(
                f"GROUNDLOOP_TINYGPT_CORPUS={custom} is not a file; point it at a text file"
            )
        corpus, source = path.read_bytes(), f"file:{path}"
        if len(corpus) < CHUNK * CHUNK_PERIOD * 2:
            raise ValueError(
                f"{path} has {len(corpus)} bytes; the splits need at least {CHUNK * CHUNK_PERIOD * 2}"
            )
    else:
        corpus, source = _cached_stdlib_corpus()
    digest = hashlib.sha256(corpus).hexdigest()
    return corpus, {
        "corpus_source": source,
        "corpus_sha256": digest,
        "corpus_bytes": str(len(corpus)),
    }


def _cached_stdlib_corpus() -> tuple[bytes, str]:
    cache_dir = os.environ.get("GROUNDLOOP_CACHE_DIR")
    stdlib = sysconfig.get_paths()["stdlib"]
    # The key names the interpreter and the file list, so a different Python builds its own.
    key = hashlib.sha256(f"{stdlib}\n{'|'.join(STDLIB_FILES)}".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"tinygpt-corpus-{key}.bin" if cache_dir else None
    if cached is not None and cached.is_file():
        return cached.read_bytes(), f"stdlib:{stdlib}"
    corpus, source = _build_stdlib_corpus()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(corpus)
        tmp.replace(cached)  # atomic, so concurrent runs never read half a file
    return corpus, source


def split_corpus(corpus: bytes) -> dict[str, torch.Tensor]:
    """Fixed split of the corpus into train / val / test byte tensors (uint8)."""
    buckets: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for index, start in enumerate(range(0, len(corpus), CHUNK)):
        phase = index % CHUNK_PERIOD
        name = "val" if phase == VAL_CHUNK else "test" if phase == TEST_CHUNK else "train"
        buckets[name].append(corpus[start : start + CHUNK])
    return {
        name: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        for name, parts in buckets.items()
    }


def load_split(name: str) -> torch.Tensor:
    if name not in ("train", "val", "test"):
        raise ValueError(f"unknown split {name!r}; use train, val or test")
    corpus, _ = load_corpus()
    return split_corpus(corpus)[name]


def eval_tokens(name: str, smoke: bool = False) -> torch.Tensor:
    """The fixed token sequence evaluate.py scores (int64), the first EVAL_TOKENS + 1 bytes."""
    count = SMOKE_EVAL_TOKENS if smoke or smoke_mode() else EVAL_TOKENS
    return load_split(name)[: count + 1].long()


def train_batches(
    batch_size: int, block_size: int, seed: int, device: str = "cpu", smoke: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random (inputs, targets) windows from the train split until the token budget is spent.

    Each batch costs batch_size * block_size tokens; the last batch that fits is the last one.
    Window positions come from a generator seeded with `seed`, so a run is reproducible.
    """
    if served := _served_batches(batch_size, block_size, seed, device):
        yield from served
        return
    train = load_split("train")
    if block_size + 1 >= len(train):
        raise ValueError(
            f"block_size {block_size} is longer than the train split ({len(train)} bytes)"
        )
    global _tokens_served
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block_size + 1)
    while _tokens_served + batch_size * block_size <= token_budget(smoke):
        _tokens_served += batch_size * block_size
        starts = torch.randint(len(train) - block_size - 1, (batch_size, 1), generator=generator)
        window = train[starts + offsets].long()
        yield window[:, :-1].to(device), window[:, 1:].to(device)


def steps_in_budget(batch_size: int, block_size: int, smoke: bool = False) -> int:
    """How many batches train_batches will yield (for learning-rate schedules)."""
    if (remote := _ask_remaining()) is not None:
        return (remote[1] - remote[0]) // (batch_size * block_size)
    return (token_budget(smoke) - _tokens_served) // (batch_size * block_size)


def tokens_served() -> int:
    if (remote := _ask_remaining()) is not None:
        return remote[0]
    return _tokens_served


# ------------------------------------------------- serving under budget_guard.py (protected)
# Requests: b"O" + seed (q) opens a stream and answers its id (i); b"B" + stream, batch, block
# (iii) answers batch * (block + 1) window bytes, or nothing once the budget is spent; b"R"
# answers (served, budget) (qq). Every answer is framed by its length (I).


def unreadable_paths() -> list[Path]:
    """The corpus as files: training must get its bytes only from the guard's stream."""
    load_corpus()  # builds the cached copy now, so it exists when the ruleset is made
    paths = [Path(sysconfig.get_paths()["stdlib"]) / name for name in STDLIB_FILES]
    if custom := os.environ.get("GROUNDLOOP_TINYGPT_CORPUS"):
        paths.append(Path(custom))
    if cache_dir := os.environ.get("GROUNDLOOP_CACHE_DIR"):
        paths.extend(Path(cache_dir).glob("tinygpt-corpus-*"))
    return paths


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<I", len(payload)) + payload)


def serve(sock: socket.socket, seed: int, smoke: bool) -> dict:
    """The guard's side: serve train windows until the budget is spent; return the count."""
    train = load_split("train")
    budget, served, streams = token_budget(smoke), 0, []
    offsets_for: dict[int, torch.Tensor] = {}
    refused = 0
    with contextlib.suppress(EOFError, OSError):
        while True:
            kind = _recv_exact(sock, 1)
            if kind == b"O":
                (stream_seed,) = struct.unpack("<q", _recv_exact(sock, 8))
                streams.append(torch.Generator().manual_seed(stream_seed))
                _send(sock, struct.pack("<i", len(streams) - 1))
            elif kind == b"R":
                _send(sock, struct.pack("<qq", served, budget))
            elif kind == b"B":
                stream, batch, block = struct.unpack("<iii", _recv_exact(sock, 12))
                cost = batch * block
                if not (0 <= stream < len(streams) and batch > 0 and 0 < block < len(train) - 1):
                    _send(sock, b"")
                    continue
                if served + cost > budget:
                    refused += 1
                    _send(sock, b"")
                    continue
                served += cost
                offsets = offsets_for.setdefault(block, torch.arange(block + 1))
                starts = torch.randint(
                    len(train) - block - 1, (batch, 1), generator=streams[stream]
                )
                _send(sock, train[starts + offsets].numpy().tobytes())
            else:
                break
    return {"tokens": served, "token_budget": budget, "refused_requests": refused}


def _guard_socket() -> socket.socket | None:
    fd = os.environ.get("GROUNDLOOP_DATA_FD")
    if not fd:
        return None
    global _socket
    if _socket is None:
        _socket = socket.socket(fileno=int(fd))
    return _socket


_socket: socket.socket | None = None


def _ask(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    (size,) = struct.unpack("<I", _recv_exact(sock, 4))
    return _recv_exact(sock, size)


def _ask_remaining() -> tuple[int, int] | None:
    if (sock := _guard_socket()) is None:
        return None
    return struct.unpack("<qq", _ask(sock, b"R"))


def _served_batches(batch_size: int, block_size: int, seed: int, device: str):
    if (sock := _guard_socket()) is None:
        return None

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        (stream,) = struct.unpack("<i", _ask(sock, b"O" + struct.pack("<q", seed)))
        while True:
            request = b"B" + struct.pack("<iii", stream, batch_size, block_size)
            payload = _ask(sock, request)
            if not payload:
                return
            window = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            window = window.view(batch_size, block_size + 1).long()
            yield window[:, :-1].to(device), window[:, 1:].to(device)

    return batches()
