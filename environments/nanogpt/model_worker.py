"""nanogpt model worker (protected): the only process of the evaluation that runs editable code.

evaluate.py starts it (`RemoteModel`) before it reads the evaluation split, as
`python model_worker.py REQUEST_FD REPLY_FD DEVICE`, under a Landlock ruleset that denies
reading the val/test shards (data.unreadable_paths()); the evaluator is non-dumpable, so this
process cannot read the split from its memory either. Here train.py is imported, the model
built with `train.build_model` from out/model.pt, and each batch answered in two steps: the
inputs (int64 token ids) come first and the model's forward runs on them; only then come the
targets, and the per-token fp32 cross-entropy goes back. Full logits never cross (too large).
Only raw tensors and JSON cross the pipes; nothing is unpickled by the evaluator. A tripwire
reports any swap of the scoring's functions or settings by model code, at start and at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn.functional as F

import budget_guard
import data
import evaluate


class RemoteModel:
    """train.py's model in a worker process that cannot read the split's shards (Landlock)
    nor this process (non-dumpable): it sees one batch at a time, its inputs before its
    targets, and returns per-token losses. Only raw tensors and JSON cross; nothing is
    unpickled here."""

    def __init__(self, device_name: str) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        unreadable = data.unreadable_paths()
        ruleset = budget_guard.landlock_ruleset(unreadable)
        self.landlock = "enforced" if ruleset else "unavailable" if unreadable else "unneeded"
        self.device = torch.device("cuda:0" if device_name == "cuda" else "cpu")
        fds = (to_worker_r, from_worker_w, *(() if ruleset is None else (ruleset,)))
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())]
            + [str(to_worker_r), str(from_worker_w), device_name],
            pass_fds=fds,
            preexec_fn=budget_guard._preexec(ruleset),
            env={k: v for k, v in os.environ.items() if k != "GROUNDLOOP_METRICS_OUT"},
            start_new_session=True,  # close() kills its whole group
        )
        for fd in fds:
            os.close(fd)
        self.send = Connection(to_worker_w, readable=False)
        self.recv = Connection(from_worker_r, writable=False)
        self._message()  # the model is built, and train.py altered nothing

    def _reply(self) -> bytes:
        try:
            return self.recv.recv_bytes()
        except (EOFError, OSError):
            raise RuntimeError("the model worker died; see its error above") from None

    def _message(self, raw: bytes | None = None) -> dict:
        raw = self._reply() if raw is None else raw
        message = json.loads(raw[1:]) if raw[:1] == b"J" else {}
        if message.get("error"):
            raise TypeError(message["error"])
        if altered := message.get("altered"):
            raise RuntimeError(
                "importing train.py or running the model changed the evaluation "
                f"({', '.join(altered[:5])}); train.py may only define the model"
            )
        if not message:
            raise RuntimeError("the model worker answered out of turn")
        return message

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape
        inputs = x.cpu().to(torch.int64).numpy().tobytes()
        self.send.send_bytes(struct.pack("<qq", rows, cols) + inputs)
        self._message()  # the forward pass is done before the targets are sent
        self.send.send_bytes(y.cpu().to(torch.int64).numpy().tobytes())
        raw = self._reply()
        if raw[:1] != b"L":
            self._message(raw)
        if len(raw) != 1 + rows * cols * 4:
            raise RuntimeError(f"the model worker sent {len(raw) - 1} bytes of losses")
        return torch.frombuffer(bytearray(raw[1:]), dtype=torch.float32).view(rows, cols)

    def close(self) -> None:
        """Ask for the worker's last tripwire check, then kill whatever it left running."""
        try:
            self.send.send_bytes(b"")
            self._message()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def serve(request_fd: int, reply_fd: int, device_name: str) -> None:
    """Runs in the worker: import train.py, build the model, answer loss requests."""
    requests = Connection(request_fd, writable=False)
    replies = Connection(reply_fd, readable=False)

    def say(**message) -> None:
        replies.send_bytes(b"J" + json.dumps(message).encode())

    device = torch.device("cuda:0" if device_name == "cuda" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    watched = _evaluation_surface()
    model = load_model(device)

    def altered() -> list[str]:
        now = _evaluation_surface()
        return sorted(k for k in watched.keys() | now.keys() if watched.get(k) != now.get(k))

    say(altered=altered())
    with torch.no_grad():
        while header := requests.recv_bytes():
            rows, cols = struct.unpack("<qq", header[:16])
            x = torch.frombuffer(bytearray(header[16:]), dtype=torch.int64).view(rows, cols)
            try:
                logits = evaluate.logits_of(model, x.to(device))
            except TypeError as exc:
                say(error=str(exc))
                return
            if type(logits) is not torch.Tensor:  # a subclass could watch the loss's inputs
                say(error=f"model(idx) returned a {type(logits).__name__}; return a plain Tensor")
                return
            # A fresh fp32 copy: model code holds no handle on what the targets are scored with.
            logits = logits.detach().to(torch.float32, copy=True)
            say(ready=True)
            y = torch.frombuffer(bytearray(requests.recv_bytes()), dtype=torch.int64)
            with torch._C.DisableTorchFunction():
                flat = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), y.to(device), reduction="none"
                )
            replies.send_bytes(b"L" + flat.float().cpu().numpy().tobytes())
    say(altered=altered())


def load_model(device: torch.device) -> torch.nn.Module:
    if not evaluate.CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"{evaluate.CHECKPOINT} is missing: training must end with harness.save_checkpoint(...)"
        )
    checkpoint = torch.load(evaluate.CHECKPOINT, map_location="cpu", weights_only=True)
    import train  # the workspace's model definition, in the worker only

    model = train.build_model(dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


def _evaluation_surface() -> dict[str, object]:
    """What the worker's scoring relies on; a tripwire (with the hack floor as backstop) for
    model code that swaps it."""
    main = sys.modules["__main__"].__dict__
    surface: dict[str, object] = {f"main.{k}": v for k, v in main.items() if callable(v)}
    surface.update({f"evaluate.{k}": v for k, v in vars(evaluate).items() if callable(v)})
    surface.update({f"data.{k}": v for k, v in vars(data).items() if callable(v)})
    surface.update({f"F.{k}": v for k, v in vars(F).items() if callable(v)})
    surface.update(
        {f"env.{k}": v for k, v in os.environ.items() if k.startswith(("GROUNDLOOP_", "NANOGPT_"))}
    )
    surface["load_state_dict"] = torch.nn.Module.load_state_dict
    surface["Tensor.to"] = torch.Tensor.to
    return surface


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
