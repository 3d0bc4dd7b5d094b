"""tinygpt evaluation (protected): val loss of the trained checkpoint, with a causality probe.

Consumes: out/ckpt.pt written by train.py ({"model": state_dict, "config": GPTConfig fields}),
the GPT / GPTConfig classes imported from the workspace's train.py (without training: its loop
runs only under `__main__`), and the fixed token sequence of data.eval_tokens(GROUNDLOOP_SPLIT).
Emits: the JSON object at GROUNDLOOP_METRICS_OUT:
  {"val_loss": mean cross-entropy in nats per byte on the split, "<split>_loss": same,
   "eval_tokens": n, "eval_window": n, "params": n, "causality_max_diff": d,
   "corpus_sha256_48": first 48 bits of the corpus digest (events carry numbers only),
   "provenance": {"corpus_sha256": ..., "corpus_source": ..., "corpus_bytes": ..., "split": ...}}
or, when the model's logits at a position depend on later tokens,
  {"rejected": "future-token leak detected at position t: ..."} and exit status 3
(also for code from train.py that alters the evaluation while it runs).

Before any editable code runs, the protected budget_guard.py's ledger (out/budget_ledger.json)
must show the run within its token and CPU budget and name this checkpoint's sha256, or the
run is rejected. train.py is imported only in a worker process (--model-worker) that cannot
read the corpus (Landlock) nor this process; it answers logits for one window at a time.
The loss is computed here from the model's logits, never by model code. Windows are scored one
at a time (batch of 1), in order, so no window can see another's future. The probe runs on
random byte sequences first, then on every scored window: the window is run again with the
bytes after a random cut replaced, and the logits up to the cut must not move.

Run: python evaluate.py (in the workspace, after train.py). GROUNDLOOP_SPLIT: val | test.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import budget_guard
import data
import torch
import torch.nn.functional as F

CHECKPOINT = Path("out/ckpt.pt")
LEDGER = budget_guard.LEDGER
MAX_EVAL_WINDOW = 1024  # longest window scored at once, whatever the model's context
PROBE_TOLERANCE = 1e-5  # max |Δlogit| allowed at positions ≤ t when tokens after t change
PROBE_SEQUENCES = 3
PROBE_CUTS = 6
EXIT_REJECTED = 3


class Rejected(Exception):
    """The run cannot be scored honestly: a future-token leak or a tampered evaluation."""


def write_metrics(payload: dict) -> None:
    target = os.environ.get("GROUNDLOOP_METRICS_OUT")
    if not target:
        print(json.dumps(payload, indent=2))
        print("GROUNDLOOP_METRICS_OUT is not set; printed the metrics instead", file=sys.stderr)
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(payload, indent=2, sort_keys=True))


def fingerprint() -> dict[str, int]:
    """Identity of every function the scoring relies on; train.py runs in this process, so
    its import-time code could swap them (e.g. patch F.cross_entropy or this module)."""
    spaces = {
        "evaluate": globals(),
        "data": vars(data),
        "torch": vars(torch),
        "F": vars(F),
        "Tensor": vars(torch.Tensor),
        "json": vars(json),
        "builtins": vars(builtins),
    }
    return {
        f"{space}.{name}": id(value)
        for space, names in spaces.items()
        for name, value in list(names.items())
    }


def check_untouched(before: dict[str, int]) -> None:
    after = fingerprint()
    changed = sorted(name for name, ident in before.items() if after.get(name) != ident)
    if changed:
        raise Rejected(
            f"the evaluation was altered while it ran: {changed[:5]} replaced by model code"
        )


def check_ledger() -> dict:
    """The protected guard's account of training, checked before any editable code runs."""
    if LEDGER.is_symlink() or not LEDGER.is_file():
        raise Rejected(
            f"no budget ledger at {LEDGER}: training must be started by the protected "
            "budget_guard.py (the manifest's entrypoint), which counts its compute"
        )
    ledger = json.loads(LEDGER.read_text())
    if ledger.get("exceeded"):
        raise Rejected(f"training exceeded its compute budget: {ledger['exceeded']}")
    served = ledger.get("served", {})
    if served.get("tokens", 0) > data.TOKEN_BUDGET:
        raise Rejected(f"training was served {served['tokens']} tokens, over the budget")
    recorded = ledger.get("outputs", {}).get(str(CHECKPOINT))
    actual = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() if CHECKPOINT.is_file() else None
    if actual is None:
        raise SystemExit(
            f"evaluate: {CHECKPOINT} not found; train.py must save its checkpoint there"
        )
    if recorded != actual:
        raise Rejected(
            f"{CHECKPOINT} is not the checkpoint training left when its budget was counted "
            "(sha256 differs from the guard's ledger)"
        )
    return ledger


class RemoteModel:
    """train.py's model, built and run in a worker process that cannot read the corpus (so no
    evaluation bytes reach model code except the window being scored) and cannot read this
    process (non-dumpable). Only raw tensors cross the pipe; nothing is unpickled here."""

    def __init__(self) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        ruleset = budget_guard.landlock_ruleset(data.unreadable_paths())
        fds = (to_worker_r, from_worker_w, *(() if ruleset is None else (ruleset,)))
        self.landlock = "enforced" if ruleset is not None else "unavailable"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--model-worker", str(to_worker_r), str(from_worker_w)],
            pass_fds=fds,
            preexec_fn=budget_guard._preexec(ruleset),
            env={k: v for k, v in os.environ.items() if k != "GROUNDLOOP_METRICS_OUT"},
        )
        for fd in fds:
            os.close(fd)
        self.send = Connection(to_worker_w, readable=False)
        self.recv = Connection(from_worker_r, writable=False)
        header = self._message()
        self.config, self.params = header["config"], header["params"]

    def _message(self) -> dict:
        try:
            message = json.loads(self.recv.recv_bytes(1 << 20))
        except (EOFError, OSError):
            raise SystemExit("evaluate: the model worker died; see its error above") from None
        if altered := message.get("altered"):
            raise Rejected(
                f"the evaluation was altered while it ran: {altered[:5]} replaced by model code"
            )
        return message

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        self.send.send_bytes(idx.to(torch.int64).numpy().tobytes())
        try:
            raw = self.recv.recv_bytes()
        except (EOFError, OSError):
            raise SystemExit("evaluate: the model worker died; see its error above") from None
        rows, cols = struct.unpack("<qq", raw[:16])
        if rows != len(idx) or cols < data.VOCAB_SIZE or len(raw) != 16 + rows * cols * 4:
            raise SystemExit(
                f"evaluate: model(idx) with idx of shape (1, {len(idx)}) returned logits of shape "
                f"({rows}, {cols}); it must return (B, T, >= {data.VOCAB_SIZE}) logits for every "
                "position"
            )
        return torch.frombuffer(bytearray(raw[16:]), dtype=torch.float32).view(rows, cols)

    def close(self) -> None:
        self.send.send_bytes(b"")
        self._message()  # the worker's last fingerprint check
        self.process.wait(timeout=30)

    def parameters(self):
        return []


def model_worker(request_fd: int, reply_fd: int) -> None:
    """Runs in the worker: import train.py, build the model, answer logits requests."""
    requests = Connection(request_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    untouched = fingerprint()
    sys.path.insert(0, str(Path.cwd()))
    import train  # the workspace's (possibly patched) model definition

    checkpoint = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    model = train.GPT(train.GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()

    def altered() -> list[str]:
        after = fingerprint()
        return sorted(name for name, ident in untouched.items() if after.get(name) != ident)

    header = {
        "config": checkpoint["config"],
        "params": sum(p.numel() for p in model.parameters()),
        "altered": altered(),
    }
    replies.send_bytes(json.dumps(header).encode())
    with torch.no_grad():
        while raw := requests.recv_bytes():
            idx = torch.frombuffer(bytearray(raw), dtype=torch.int64)
            out = model(idx[None])
            logits = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
                shape = getattr(logits, "shape", type(logits).__name__)
                raise SystemExit(f"evaluate: model(idx) returned {shape}, not (B, T, vocab)")
            flat = logits[0].float().contiguous()
            replies.send_bytes(struct.pack("<qq", *flat.shape) + flat.numpy().tobytes())
    replies.send_bytes(json.dumps({"altered": altered()}).encode())


def logits_of(model: RemoteModel, idx: torch.Tensor) -> torch.Tensor:
    """(T, vocab) float logits of one sequence `idx` (T,)."""
    return model.logits(idx)


def prefix_change(
    model, sequence: torch.Tensor, logits: torch.Tensor, cut: int, generator
) -> float:
    """Largest logit change at positions ≤ cut when every token after `cut` is replaced."""
    changed = sequence.clone()
    changed[cut + 1 :] = torch.randint(
        data.VOCAB_SIZE, (len(sequence) - cut - 1,), generator=generator
    )
    diff = (logits_of(model, changed) - logits)[: cut + 1].abs().amax(dim=-1)
    leaking = ~(diff <= PROBE_TOLERANCE)  # NaN counts as a leak
    if leaking.any():
        position = int(torch.nonzero(leaking)[0])
        raise Rejected(
            f"future-token leak detected at position {position}: changing the tokens after "
            f"position {cut} changed the logits at position {position} by {diff[position].item():.3g} "
            f"(tolerance {PROBE_TOLERANCE})"
        )
    return diff.max().item()


def probe_random_sequences(model, window: int, generator) -> float:
    worst = 0.0
    for _ in range(PROBE_SEQUENCES):
        sequence = torch.randint(data.VOCAB_SIZE, (window,), generator=generator)
        logits = logits_of(model, sequence)
        cuts = {
            0,
            window - 2,
            *torch.randint(window - 1, (PROBE_CUTS,), generator=generator).tolist(),
        }
        for cut in sorted(cuts):
            worst = max(worst, prefix_change(model, sequence, logits, cut, generator))
    return worst


def score(model, tokens: torch.Tensor, window: int, generator) -> tuple[float, float]:
    """Mean next-byte cross-entropy over all of tokens[1:] in consecutive windows, each one
    probed at a random cut; returns (loss, largest prefix change)."""
    total = torch.zeros((), dtype=torch.float64)
    count, worst = len(tokens) - 1, 0.0
    for start in range(0, count, window):
        x = tokens[start : min(start + window, count)]
        y = tokens[start + 1 : start + 1 + len(x)]
        logits = logits_of(model, x)
        if len(x) >= 2:
            cut = int(torch.randint(len(x) - 1, (1,), generator=generator))
            worst = max(worst, prefix_change(model, x, logits, cut, generator))
        total += F.cross_entropy(logits, y, reduction="sum").double()
    return (total / count).item(), worst


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # small forward passes; one thread is immune to contention
    split = os.environ.get("GROUNDLOOP_SPLIT", "val")
    if split not in ("val", "test"):
        raise SystemExit(
            f"evaluate: GROUNDLOOP_SPLIT={split!r}; use val (search) or test (final reports)"
        )
    started = time.perf_counter()
    # Nothing the model worker starts may read this process, and all of it dies before the
    # metrics are written (it could otherwise overwrite them).
    budget_guard._libc.prctl(budget_guard.PR_SET_DUMPABLE, 0, 0, 0, 0)
    budget_guard._libc.prctl(budget_guard.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _, provenance = data.load_corpus()
    generator = torch.Generator().manual_seed(1234)
    untouched = fingerprint()
    try:
        ledger = check_ledger()
        provenance = {**provenance, "cpu_seconds": str(ledger["cpu_seconds"])}
        model = RemoteModel()
        provenance["model_landlock"] = model.landlock
        tokens = data.eval_tokens(split)  # read only once the model exists, in its own process
        window = min(int(model.config.get("block_size", MAX_EVAL_WINDOW)), MAX_EVAL_WINDOW)
        if window < 2:
            raise SystemExit(f"evaluate: block_size {window} is too short to evaluate")
        with torch.no_grad():
            worst = probe_random_sequences(model, window, generator)
            loss, worst_scored = score(model, tokens, window, generator)
        model.close()
        budget_guard.Guard(0).kill_tree()
        check_untouched(untouched)
    except Rejected as verdict:
        budget_guard.Guard(0).kill_tree()
        print(f"evaluate: REJECTED: {verdict}", file=sys.stderr)
        write_metrics({"rejected": str(verdict), "provenance": provenance})
        raise SystemExit(EXIT_REJECTED) from None
    metrics = {
        "val_loss": loss,
        f"{split}_loss": loss,
        "eval_tokens": len(tokens) - 1,
        "eval_window": window,
        "params": model.params,
        "causality_max_diff": max(worst, worst_scored),
        "corpus_sha256_48": int(provenance["corpus_sha256"][:12], 16),
        "provenance": {**provenance, "split": split},
    }
    if not math.isfinite(loss):
        print(f"evaluate: the {split} loss is {loss}; training diverged", file=sys.stderr)
    write_metrics(metrics)
    print(
        f"evaluate: {split}_loss {loss:.4f} over {len(tokens) - 1} bytes (window {window}) in "
        f"{time.perf_counter() - started:.1f}s, causality max diff {metrics['causality_max_diff']:.2e}, "
        f"corpus sha256 {provenance['corpus_sha256'][:16]}",
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--model-worker"]:
        model_worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
