"""The reference weights ``W0`` of a phase: kept where the user can afford them, written to disk once.

``W0`` is the only weight-sized thing the metrics need every time (``dW = W - W0``). Where it lives
(``instruments.reference``):

    device  fp32 on the weights' device (fastest; one fp32 copy of the tracked weights there)
    cpu     fp32 in host memory (pinned under CUDA), copied to the device one row block at a time when a
            metric is due: the accelerator holds only the covariances. Use it when GPU memory is tight.
    disk    only in the phase's ``W0`` file, read back one row block at a time when a metric is due: no
            copy in memory at all (on a CPU-only machine this is the way to keep ``W0`` out of RAM).
            The file must be on a filesystem every process sees.

LoRA matrices whose base weight is frozen keep no dense ``W0`` in any mode: the base cancels from
``W - W0``, so ``W0`` is the adapters' starting factors ``(scale, B0, A0)``, a few MB. A matrix that is
frozen at the phase start (``requires_grad`` off, no adapter: the matrices a LoRA run does not target)
keeps nothing: its delta is zero. Should its weight change after all (its version counter moves), its
metrics are skipped with a warning rather than measured against a ``W0`` that was never kept.

**The W0 file.** A checkpoint's instrument state holds no weights: it names ``W0`` by the sha256 of
its file, ``W0-{sha256[:16]}.safetensors``, written once per phase into ``directory`` (the run's
instrument folder; a temporary folder when none is given) the first time the state is asked for (at
capture, in ``disk`` mode). A resumed suite finds the file by that digest and checks it. Phases that start
from the same weights (a run's alignment objectives, all from one checkpoint) have the same file: given a
``shared`` folder (the run's root), a phase whose file is already under it links to that one (a hard link:
one copy on disk, each phase's folder still complete) instead of keeping a second. The file is
written in a stream, one matrix at a time (:func:`write_safetensors`): memory never holds more than one
matrix of it. Keys: ``weights/L{i}/{r}/W0`` (fp32, out x in), and for LoRA
``weights/L{i}/{r}/lora.{adapter}.{A,B,scale}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from weightgeom.hooks import keys
from weightgeom.hooks.distributed import broadcast_bytes, rank, world_size
from weightgeom.hooks.roles import TrackedMatrix, local

REFERENCE_PLACES = ("device", "cpu", "disk")
DIGEST_KEY = "meta/w0_sha256"  # in the instrument state: the W0 file's sha256, 32 uint8
DEFAULT_DIRECTORY = Path(tempfile.gettempdir()) / "weightgeom-w0"
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}

Factors = list[tuple[float, Tensor, Tensor]]


def file_name(digest: bytes) -> str:
    return f"W0-{digest.hex()[:16]}.safetensors"


def write_safetensors(path: Path, items: Iterable[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]],
                      metadata: dict[str, str] | None = None) -> bytes:
    """Write a safetensors file whose tensors are produced one at a time (``items``: name, shape,
    dtype, producer), atomically (a ``.tmp`` renamed into place); returns the sha256 of its bytes.

    The format (huggingface/safetensors): an 8-byte little-endian header length, a JSON header with
    each tensor's dtype, shape and byte range (padded with spaces to a multiple of 8), then the data.
    Knowing every shape up front is what lets the header come first and the data stream after it."""
    items = list(items)
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape, dtype, _ in items:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        for name, shape, dtype, produce in items:
            tensor = produce().detach().to(device="cpu", dtype=dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, announced {tuple(shape)}")
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
            f.write(data)  # straight from the tensor's memory: no bytes copy of a weight-sized matrix
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return digest.digest()


def sha256_of(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.digest()


class ReferenceWeights:
    """``W0`` of every tracked matrix, kept in ``place`` (:data:`REFERENCE_PLACES`), with its file in
    ``directory`` (linked to an identical one under ``shared`` when there is one). Read it through
    :meth:`rows` (whole-matrix row blocks), :meth:`local` (this process's rows of a sharded weight) and
    :meth:`factors` (a factored LoRA matrix)."""

    def __init__(self, tracked: list[TrackedMatrix], place: str = "device", directory: str | Path | None = None,
                 shared: str | Path | None = None):
        if place not in REFERENCE_PLACES:
            raise ValueError(f"instruments.reference must be one of {list(REFERENCE_PLACES)}, got {place!r}")
        self.tracked, self.place = tracked, place
        self.directory = Path(directory) if directory is not None else DEFAULT_DIRECTORY
        self.shared = Path(shared) if shared is not None else None
        self.clear()

    def clear(self) -> None:
        self.dense: dict[str, Tensor] = {}  # key -> fp32 (out, in), or this process's rows when sharded
        self.lora: dict[str, Factors] = {}  # key -> [(scale, B0, A0)]
        self.frozen: dict[str, int] = {}  # key -> the weight's version counter at capture (nothing else kept)
        self.digest: bytes | None = None
        self.path: Path | None = None

    @property
    def captured(self) -> bool:
        return bool(self.dense or self.lora or self.frozen or self.path)

    # ----- capture ---------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self) -> None:
        """The current weights become ``W0`` (a new phase). In ``disk`` mode they go straight to the
        file (gathered when sharded: a collective); otherwise the file waits for :meth:`persist`."""
        self.clear()
        for tm in self.tracked:
            factors = tm.lora_factors()
            base = getattr(tm.module, "base_layer", tm.module).weight
            if factors is not None:
                self.lora[tm.key] = [(s, B.clone(), A.clone()) for s, B, A in factors]
            elif base is tm.module.weight and not base.requires_grad:
                self.frozen[tm.key] = base._version
            elif self.place != "disk":
                self.dense[tm.key] = self._keep(_current(tm))
        if self.place == "disk":
            self.persist()

    def _keep(self, w: Tensor) -> Tensor:
        if self.place == "cpu" and w.device.type != "cpu":
            return w.to("cpu").pin_memory() if torch.cuda.is_available() else w.to("cpu")
        return w

    # ----- the file --------------------------------------------------------------------------------
    def persist(self) -> bytes:
        """Write the W0 file if this phase has none yet (a collective when sharded or under several
        processes: every process calls it; the main one writes) and return its digest."""
        if self.digest is not None:
            return self.digest
        items = []
        for tm in self.tracked:
            if tm.key in self.frozen:
                continue
            if tm.key in self.lora:
                for name, (scale, B, A) in _lora_items(self.lora[tm.key]):
                    base = keys.state_key(keys.WEIGHTS, tm.key, name)
                    items += [(f"{base}.B", tuple(B.shape), torch.float32, lambda B=B: B),
                              (f"{base}.A", tuple(A.shape), torch.float32, lambda A=A: A),
                              (f"{base}.scale", (), torch.float32, lambda s=scale: torch.tensor(s))]
            else:
                items.append((keys.state_key(keys.WEIGHTS, tm.key, "W0"), _shape(tm), torch.float32,
                              lambda tm=tm: self._whole(tm)))
        if world_size() > 1 and any(tm.sharded for tm in self.tracked):
            # every process takes part in the gathers; the main one writes
            digest = self._write(items) if rank() == 0 else self._gather_only(items)
        else:
            digest = self._write(items) if rank() == 0 else b""
        self.digest = broadcast_bytes(digest, 32)
        self.path = self.directory / file_name(self.digest)
        return self.digest

    def _write(self, items) -> bytes:
        tmp = self.directory / f"W0-writing-{os.getpid()}.safetensors"
        digest = write_safetensors(tmp, items, metadata={"format": "weightgeom-w0", "version": "1"})
        final = self.directory / file_name(digest)
        # the same W0 written before (content-addressed) or by another phase of the run: keep one copy
        if not final.exists() and not _link_to_twin(final, self.shared, digest):
            tmp.replace(final)
        tmp.unlink(missing_ok=True)
        return digest

    @staticmethod
    def _gather_only(items) -> bytes:
        for _, _, _, produce in items:
            produce()
        return b""

    def _whole(self, tm: TrackedMatrix) -> Tensor:
        """The whole W0 of a dense matrix (gathered from this process's rows when sharded)."""
        if tm.key in self.dense:
            kept = self.dense[tm.key]
            return tm.gather(kept.to(local(tm.module.weight).device)) if _rows_only(tm) else kept
        return _current_whole(tm)  # disk mode at capture: the weights now are W0

    def load(self, digest: bytes, search: Iterable[Path] = ()) -> None:
        """Make the W0 file with sha256 ``digest`` this phase's ``W0`` (a resume). Looked for in
        ``search``, then in ``directory`` and :data:`DEFAULT_DIRECTORY`; its bytes are checked."""
        name = file_name(digest)
        places = [*map(Path, search), self.directory, DEFAULT_DIRECTORY]
        found = next((p / name for p in places if (p / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"the instrument state refers to reference weights W0 {name} (sha256 {digest.hex()[:16]}...), "
                f"found in none of {', '.join(map(str, dict.fromkeys(places)))}: it was written beside the run's "
                "first checkpoint of this phase (RUN/instruments/ for `harness run`, OUTPUT_DIR/weightgeom/ for the "
                "callback); copy it back there, or pass its folder as reference_dir")
        if sha256_of(found) != digest:
            raise ValueError(f"{found} does not hold the reference weights the state refers to (its sha256 differs): "
                             "the file was changed or replaced; W0 cannot be restored exactly")
        self.digest, self.path = digest, found
        with safe_open(str(found), framework="pt") as f:
            self.load_tensors(f.get_tensor, set(f.keys()))

    def load_tensors(self, get: Callable[[str], Tensor], names: set[str]) -> None:
        """``W0`` from ``weights/L{i}/{r}/W0`` (and LoRA factor) tensors, read one at a time with ``get``:
        a W0 file's, or a legacy instrument state's that still held them. In ``disk`` mode dense
        matrices are not read (they are read back from the file when a metric is due)."""
        path, digest = self.path, self.digest
        self.clear()
        self.path, self.digest = path, digest
        for tm in self.tracked:
            prefix = keys.state_key(keys.WEIGHTS, tm.key, "")
            lora = sorted({n[len(prefix):].rsplit(".", 1)[0] for n in names if n.startswith(prefix + "lora.")})
            if lora:
                live = tm.lora_factors()
                device = live[0][1].device if live else torch.device("cpu")
                self.lora[tm.key] = [(float(get(f"{prefix}{n}.scale")), get(f"{prefix}{n}.B").float().to(device),
                                      get(f"{prefix}{n}.A").float().to(device)) for n in lora]
                continue
            if prefix + "W0" not in names and not getattr(tm.module, "weight", torch.empty(0)).requires_grad:
                self.frozen[tm.key] = tm.module.weight._version  # frozen at the phase start: nothing was kept
                continue
            if prefix + "W0" not in names:
                raise KeyError(f"the reference weights have no {prefix}W0: were they saved from a model with the same "
                               "layers and roles (instruments.roles / instruments.layers)?")
            if self.place == "disk":
                continue
            whole = get(prefix + "W0").float()
            kept = tm.scatter(whole) if _rows_only(tm) else whole
            self.dense[tm.key] = self._keep(kept.to(_current_device(tm)))

    # ----- reading ---------------------------------------------------------------------------------
    def factors(self, tm: TrackedMatrix) -> Factors | None:
        return self.lora.get(tm.key)

    def is_frozen(self, tm: TrackedMatrix) -> bool | None:
        """True when ``tm`` was frozen at the phase start and is unchanged since (its delta is zero);
        False when it changed after all (no ``W0`` was kept: nothing can be measured); None otherwise."""
        if tm.key not in self.frozen:
            return None
        return tm.module.weight._version == self.frozen[tm.key]

    def rows(self, tm: TrackedMatrix, r0: int, r1: int, device: torch.device) -> Tensor:
        """Rows ``[r0, r1)`` of the whole fp32 ``W0`` of a dense, unsharded matrix, on ``device``."""
        if self.place == "disk":
            with safe_open(str(self.path), framework="pt") as f:
                block = f.get_slice(keys.state_key(keys.WEIGHTS, tm.key, "W0"))[r0:r1]
            return block.to(device)
        return self.dense[tm.key][r0:r1].to(device, non_blocking=True)

    def local(self, tm: TrackedMatrix) -> Tensor:
        """This process's rows of the fp32 ``W0`` of a sharded plain weight (the whole matrix otherwise)."""
        if self.place == "disk":
            with safe_open(str(self.path), framework="pt") as f:
                whole = f.get_tensor(keys.state_key(keys.WEIGHTS, tm.key, "W0"))
            return tm.scatter(whole) if _rows_only(tm) else whole
        kept = self.dense[tm.key]
        return kept.to(local(tm.module.weight).device, non_blocking=True)

    def bytes_in_memory(self) -> int:
        tensors = list(self.dense.values()) + [t for f in self.lora.values() for _, B, A in f for t in (B, A)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _link_to_twin(final: Path, shared: Path | None, digest: bytes) -> bool:
    """Make ``final`` a hard link to a file of the same name (so the same sha256 prefix) under ``shared``
    whose bytes hash to ``digest``. False when there is none or the file system
    refuses hard links (another device, no support): the caller keeps its own copy."""
    if shared is None or not shared.is_dir():
        return False
    for twin in shared.rglob(final.name):
        if twin.parent == final.parent or not twin.is_file() or sha256_of(twin) != digest:
            continue
        try:
            os.link(twin, final)
        except OSError:
            return False
        return True
    return False


def _lora_items(factors: Factors):
    return [(f"lora.{i}", f) for i, f in enumerate(factors)]


def _rows_only(tm: TrackedMatrix) -> bool:
    """Kept as this process's rows: a sharded plain weight."""
    return tm.plain and tm.sharded


def _current(tm: TrackedMatrix) -> Tensor:
    """The weight now, fp32, as W0 keeps it: this process's rows of a sharded plain weight, else whole."""
    if _rows_only(tm):
        return local(tm.module.weight).detach().float().clone()
    return tm.weight()


def _current_whole(tm: TrackedMatrix) -> Tensor:
    return tm.gather(local(tm.module.weight).detach().float()) if _rows_only(tm) else tm.weight()


def _current_device(tm: TrackedMatrix) -> torch.device:
    return local(getattr(tm.module, "base_layer", tm.module).weight).device


def _shape(tm: TrackedMatrix) -> tuple[int, int]:
    w = getattr(tm.module, "base_layer", tm.module).weight
    out, inp = (w.shape[1], w.shape[0]) if tm.transposed else (w.shape[0], w.shape[1])
    return (len(tm.rows) if tm.rows is not None else out, inp)
