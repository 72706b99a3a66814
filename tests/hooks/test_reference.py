"""The W0 file: streamed safetensors writing, content addressing, and the three places W0 can live."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_model
from weightgeom.hooks import reference
from weightgeom.hooks.reference import ReferenceWeights, file_name, write_safetensors
from weightgeom.hooks.roles import resolve_tracked


def test_the_streamed_file_is_a_safetensors_file_and_its_digest_is_its_sha256(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b/c": torch.arange(7, dtype=torch.float64), "s": torch.tensor(2.5),
               "h": torch.randn(2, 2).bfloat16()}
    produced = []

    def producer(name):
        def produce():
            produced.append(name)  # one at a time, in order
            return tensors[name]
        return produce

    items = [(k, tuple(v.shape), v.dtype, producer(k)) for k, v in tensors.items()]
    digest = write_safetensors(tmp_path / "x.safetensors", items, metadata={"format": "test"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert produced == list(tensors)
    for name, value in tensors.items():
        assert torch.equal(back[name], value), name
    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).digest()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_producer_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="produced shape"):
        write_safetensors(tmp_path / "x.safetensors", [("a", (2, 2), torch.float32, lambda: torch.zeros(3))])


@pytest.mark.parametrize("place", ["device", "cpu", "disk"])
def test_each_place_gives_the_same_w0_rows(tmp_path, place):
    model = make_model("llama")
    tracked = resolve_tracked(model)
    ref = ReferenceWeights(tracked, place, tmp_path)
    ref.capture()
    start = {tm.key: tm.weight() for tm in tracked}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # W0 must not follow the live weights
    for tm in tracked:
        torch.testing.assert_close(ref.rows(tm, 1, 5, torch.device("cpu")), start[tm.key][1:5], rtol=0, atol=0)
    held = ref.bytes_in_memory()
    assert held == (0 if place == "disk" else sum(w.numel() * 4 for w in start.values())), held
    digest = ref.persist()
    assert (tmp_path / file_name(digest)).is_file()
    assert ref.persist() == digest  # written once per phase


def test_the_same_w0_is_one_file_and_another_w0_another(tmp_path):
    model = make_model("llama")
    tracked = resolve_tracked(model)
    first, second = ReferenceWeights(tracked, "device", tmp_path), ReferenceWeights(tracked, "device", tmp_path)
    first.capture()
    second.capture()
    assert first.persist() == second.persist()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    second.capture()
    assert second.persist() != first.persist()
    assert len(list(tmp_path.glob("W0-*.safetensors"))) == 2


def test_loading_checks_the_digest_and_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "DEFAULT_DIRECTORY", tmp_path / "default")  # other tests write the same W0 there
    model = make_model("llama")
    tracked = resolve_tracked(model)
    ref = ReferenceWeights(tracked, "device", tmp_path / "a")
    ref.capture()
    digest = ref.persist()
    other = ReferenceWeights(tracked, "device", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=file_name(digest)):
        other.load(digest, search=[tmp_path / "nowhere"])
    other.load(digest, search=[tmp_path / "a"])
    for tm in tracked:
        assert torch.equal(other.rows(tm, 0, 3, torch.device("cpu")), ref.rows(tm, 0, 3, torch.device("cpu")))
    path = tmp_path / "a" / file_name(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs"):
        other.load(digest, search=[tmp_path / "a"])


def test_phases_from_the_same_weights_share_one_file_under_the_run_root(tmp_path, monkeypatch):
    """A run's alignment phases all start from one checkpoint: the second phase's W0 file is a hard link to
    the first's (one copy on disk, each folder complete); other weights get their own file; where hard
    links fail, each phase keeps its own copy."""
    model = make_model("llama")

    def persist(phase: str) -> tuple[bytes, object]:
        ref = ReferenceWeights(resolve_tracked(model), "disk", tmp_path / phase / "instruments", shared=tmp_path)
        ref.capture()
        digest = ref.persist()
        return digest, (tmp_path / phase / "instruments" / file_name(digest)).stat()

    first, _ = persist("align/dpo")
    second, b = persist("align/g0.00")
    a = (tmp_path / "align/dpo/instruments" / file_name(first)).stat()
    assert first == second and (a.st_ino, a.st_nlink, b.st_nlink) == (b.st_ino, 2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    third, c = persist("align/g1.00")
    assert third != first and c.st_nlink == 1

    def refuse(*args):
        raise OSError("no hard links here")

    monkeypatch.setattr(reference.os, "link", refuse)
    fourth, d = persist("align/mix")
    assert fourth == third and d.st_ino != c.st_ino and d.st_nlink == 1 and d.st_size == c.st_size
    assert not list(tmp_path.rglob("W0-writing-*"))
