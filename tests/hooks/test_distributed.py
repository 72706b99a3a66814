"""Two CPU processes (gloo; DDP, or FSDP2 with every weight sharded), each feeding half of every batch,
report the same instrument state and metrics as one process that sees the whole batch.

Each rank scales its loss by ``world / N`` (N = loss tokens of the global batch), so DDP's gradient
average equals the single-process token mean, and sets the loss normalizer to ``N / world``, so its
per-token ``delta`` is the single-process one. Instruments keep local sums; ``global_state()``
all-reduces them (hooks/distributed.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.conftest import make_batch, make_model, token_loss_sum
from weightgeom.hooks.roles import full as whole
from weightgeom.hooks.suite import InstrumentSuite

WORLD = 2
K = 4
SUITE_KW = dict(k=K, every_n=1, dtype=torch.float64, seed=0, coherence=True)  # coherence is opt-in


def _batches():
    return [make_batch(batch=4, seq=8, pad_last=2, seed=s) for s in (1, 2)]


def run(rank: int, world: int, sharding: str = "ddp", reference: str = "device", folder: str | None = None) -> dict:
    """Two SGD steps with the suite attached; this rank trains on rows ``rank::world``-block of
    each batch. Returns local and global covariance state, per-step metrics, and the global state
    seen after a resume from this run's snapshot. ``sharding``: ``ddp`` (replicas) or ``fsdp``
    (FSDP2: each decoder layer and the root sharded over the processes, weights as ``DTensor``)."""
    model = make_model("llama")
    if world > 1 and sharding == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    suite = InstrumentSuite(model, **SUITE_KW, reference=reference, reference_dir=folder)
    metrics, solved = [], []
    with suite.attached(net, opt):
        for step, full in enumerate(_batches(), 1):
            n = int((full["labels"][:, 1:] != -100).sum())
            rows = full["input_ids"].shape[0] // world
            local = {k: v[rank * rows:(rank + 1) * rows] for k, v in full.items()}
            opt.zero_grad()
            loss_sum, _ = token_loss_sum(net, local)
            suite.set_loss_normalizer(n / world)
            (loss_sum * world / n).backward()
            opt.step()
            metrics.append(suite.after_optimizer_step(step))
            solved.append(set(suite.solved))
    snapshot = suite.snapshot_state()  # collective: every rank calls it, as a trainer's checkpoint does
    resumed = InstrumentSuite(model, **SUITE_KW, reference=reference, reference_dir=folder)
    resumed.load_state_dict(snapshot)  # every rank loads the same (process-summed) snapshot
    return {"local": suite.cov.state_dict(), "global": suite.cov.global_state(), "metrics": metrics, "solved": solved,
            "resumed_global": resumed.cov.global_state(), "snapshot": snapshot,
            "resumed_snapshot": resumed.snapshot_state(),
            "weights": [whole(p.detach()).clone() for p in model.parameters()]}


def _worker(rank: int, world: int, init_file: str, out_dir: str, sharding: str, reference: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run(rank, world, sharding, reference, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp, sharding: str, reference: str = "device") -> list[dict]:
    mp.spawn(_worker, args=(WORLD, str(tmp / "store"), str(tmp), sharding, reference), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return run(0, 1)


@pytest.fixture(scope="module")
def results(tmp_path_factory, single):
    return _spawn(tmp_path_factory.mktemp("ddp"), "ddp"), single


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, single):
    return _spawn(tmp_path_factory.mktemp("fsdp"), "fsdp"), single


def test_fsdp_with_w0_on_disk_gives_the_same_metrics(tmp_path, single):
    """reference: disk under FSDP2: the main process writes the whole W0 once, every process reads its own
    rows back when a metric is due; the metrics are those of one process holding W0 in memory."""
    ranks = _spawn(tmp_path, "fsdp", "disk")
    assert len(list(tmp_path.glob("W0-*.safetensors"))) == 1
    for step, expected in enumerate(single["metrics"], 1):
        got = ranks[0]["metrics"][step - 1]
        assert got == ranks[1]["metrics"][step - 1] and got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)


def test_global_state_equals_single_process(results):
    ranks, single = results
    for r, res in enumerate(ranks):
        assert res["global"].keys() == single["local"].keys()
        for key, value in single["local"].items():
            # the subsampling generator's state: the same seed on every rank
            if key.startswith("meta/") or key.endswith("count"):
                assert torch.equal(res["global"][key], value), (r, key)
            else:  # shards and the full batch round differently in fp32 (measured: ~1e-7 relative)
                rel = float((res["global"][key] - value).norm() / value.norm())
                assert rel < 1e-5, (r, key, rel)
    # each rank only saw its shard: rank 0 two full rows, rank 1 one full row and one padded row
    assert [int(res["local"]["cov_in/L0/attn_in/count"]) for res in ranks] == [2 * 16, 2 * 14]
    assert int(single["local"]["cov_in/L0/attn_in/count"]) == 60
    for w0, w1, w in zip(ranks[0]["weights"], ranks[1]["weights"], single["weights"]):
        assert torch.equal(w0, w1)  # DDP kept the replicas identical
        torch.testing.assert_close(w0, w, rtol=1e-5, atol=1e-7)


def test_metrics_after_reduction_equal_single_process(results):
    ranks, single = results
    for step, expected in enumerate(single["metrics"], 1):
        assert ranks[0]["metrics"][step - 1] == ranks[1]["metrics"][step - 1], step  # every rank reports the same
        got = ranks[0]["metrics"][step - 1]
        assert got.keys() == expected.keys()
        assert "rsf_out_delta/L1/o" in got and "spike_in/L0/attn_in/top1" in got
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("name", ["results", "fsdp_results"])
def test_the_eigendecompositions_are_split_over_the_processes_not_repeated(name, request):
    """Each covariance's spectrum is computed by one process (longest first onto the least loaded) and
    shared; together the processes computed exactly what one process computes alone."""
    ranks, single = request.getfixturevalue(name)
    for step, alone in enumerate(single["solved"]):
        mine = [res["solved"][step] for res in ranks]
        assert all(mine) and not set.intersection(*mine), (step, mine)
        assert set.union(*mine) == alone, step


def test_resume_from_snapshot_counts_each_token_once(results):
    """Every rank loads the same process-summed snapshot; the next reduction must not multiply it."""
    ranks, _ = results
    for res in ranks:
        for key, value in res["global"].items():
            assert torch.equal(res["resumed_global"][key], value), key


def test_fsdp_sharded_weights_give_single_process_metrics_and_snapshots(fsdp_results):
    """Under FSDP2 the update instrument keeps each process's rows of the weights; metrics and
    snapshots gather them: equal to one process that saw the whole batch, on every rank."""
    ranks, single = fsdp_results
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for step, expected in enumerate(single["metrics"], 1):
        got = ranks[0]["metrics"][step - 1]
        assert got.keys() == expected.keys() and "coherence/L1/down" in got
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    for res in ranks:
        for key in (k for k in single["snapshot"] if k.startswith(("weights/", "cov_"))):
            got, expected = res["snapshot"][key].double(), single["snapshot"][key].double()
            # shards and the whole batch sum in another order (fp32): ~1e-7 relative, as under DDP
            assert float((got - expected).norm()) <= 1e-5 * float(expected.norm()) + 1e-9, key
        for w, w_single in zip(res["weights"], single["weights"]):
            torch.testing.assert_close(w, w_single, rtol=1e-5, atol=1e-7)


def test_fsdp_snapshot_round_trip_restores_each_processs_rows(fsdp_results):
    """A snapshot (whole matrices) loaded by a sharded suite is cut into each process's rows; saved
    again it is the same snapshot (gradient norms counted once over the processes)."""
    ranks, _ = fsdp_results
    for res in ranks:
        for key, value in res["snapshot"].items():
            if key.startswith("weights/"):
                assert torch.equal(res["resumed_snapshot"][key], value), key
