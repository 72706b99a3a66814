"""What the instruments hold and write (sizes, not times), and that holding less changes no number.

The quantities' brute-force tests (tests/hooks/quantities/) run with ``capture="every_step"``, which
keeps the last update and gradient between steps; the default ``capture="due"`` takes them only inside a
due optimizer step. Here the lean paths are checked against those: the same metrics, less memory."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch, make_model, token_loss_sum
from tests.hooks.brute_force import K
from weightgeom.hooks import geometry as geo
from weightgeom.hooks import keys, reference
from weightgeom.hooks.quantities import DEFAULT_QUANTITIES
from weightgeom.hooks.reference import DIGEST_KEY, file_name
from weightgeom.hooks.roles import ROLES
from weightgeom.hooks.suite import InstrumentSuite
from weightgeom.hooks.views import LowRank


@pytest.fixture(autouse=True)
def _own_default_w0_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "DEFAULT_DIRECTORY", tmp_path / "w0-default")


def train(model, suite, steps, *, announce=True, lr=1e-2, seed_offset=0):
    """AdamW steps as a trainer drives the suite; returns the metrics of each step (None when not due)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    with suite.attached(model, opt):
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss_sum, n = token_loss_sum(model, make_batch(seed=step + seed_offset))
            suite.set_loss_normalizer(n)
            (loss_sum / n).backward()
            if announce:
                suite.before_optimizer_step(step, force=step == steps)
            opt.step()
            out.append(suite.after_optimizer_step(step, force=step == steps))
    return out


def weight_bytes(suite) -> int:
    return sum(tm.weight().numel() * 4 for tm in suite.tracked)


class Probe:
    """A quantity that records what the suite holds while the metrics are computed: before the matrices
    are read (``requests``) and after (``compute``)."""

    def __init__(self):
        self.held, self.after = [], []

    def requests(self, m):
        self.held.append(m.upd.held_bytes())
        return []

    def compute(self, m):
        self.after.append(m.upd.held_bytes())
        from weightgeom.hooks.measurement import Values  # noqa: PLC0415
        return Values()


def test_due_capture_gives_the_every_step_metrics():
    kw = dict(input_roles=ROLES, k=K, every_n=2, log_spaced=False, dtype=torch.float64, metric_dtype="float64")
    model_a, model_b = make_model("llama"), make_model("llama")
    a = train(model_a, InstrumentSuite(model_a, **kw), 5)
    b = train(model_b, InstrumentSuite(model_b, capture="every_step", **kw), 5)
    assert [m is not None for m in a] == [False, True, False, True, True]
    for got, expected in zip(a, b):
        assert got == expected
    assert "rsf_in_update/L0/q" in a[-1] and "rsf_out_pred_grad/L1/down" in a[-1]


def test_a_due_step_without_announcement_still_gets_its_views_from_the_schedule():
    model = make_model("llama")
    metrics = train(model, InstrumentSuite(model, k=K, every_n=2, log_spaced=False), 3, announce=False)
    assert "rsf_in_grad/L0/q" in metrics[1]  # step 2: on the schedule, inferred as last step + 1
    # step 3 is forced but was not announced: the cumulative delta is measured, the views were not captured
    assert "rsf_in/L0/q" in metrics[2] and "rsf_in_update/L0/q" not in metrics[2]


def test_between_steps_only_w0_and_the_covariances_are_held_and_a_due_step_adds_one_copy():
    model = make_model("llama")
    probe = Probe()
    suite = InstrumentSuite(model, k=K, every_n=2, log_spaced=False,
                            quantities=(*DEFAULT_QUANTITIES, probe))
    train(model, suite, 4)
    held = suite.held_bytes()
    copy = weight_bytes(suite)
    assert held["reference"] == copy and held["views"] == 0 and held["coherence"] == 0, held
    widths = [s[0].shape[0] for s in suite.cov.sums_in.values()] + [s[0].shape[0] for s in suite.cov.sums_out.values()]
    assert held["covariances"] == sum(4 * (n * n + n) for n in widths[:len(suite.cov.sums_in)]) + \
        sum(4 * n * n for n in widths[len(suite.cov.sums_in):])
    # inside a due step: the pre-step copy (now the update), and no copy of the gradient (read live); the
    # update copies go as soon as they are read, before the deltas are
    assert [h["views"] for h in probe.held] == [copy, copy]
    assert [h["views"] for h in probe.after] == [0, 0]


def test_with_w0_on_disk_nothing_weight_sized_is_in_memory(tmp_path):
    model = make_model("llama")
    suite = InstrumentSuite(model, k=K, every_n=2, reference="disk", reference_dir=tmp_path)
    train(model, suite, 2)
    assert suite.held_bytes()["reference"] == 0
    assert len(list(tmp_path.glob("W0-*.safetensors"))) == 1  # written once, at the phase start


@pytest.mark.parametrize("place", ["cpu", "disk"])
def test_each_w0_place_gives_the_same_metrics(tmp_path, place):
    kw = dict(input_roles=ROLES, k=K, every_n=2, log_spaced=False)
    model_a, model_b = make_model("llama"), make_model("llama")
    a = train(model_a, InstrumentSuite(model_a, **kw), 4)
    b = train(model_b, InstrumentSuite(model_b, reference=place, reference_dir=tmp_path, **kw), 4)
    assert a == b


def test_the_state_holds_no_weight_sized_tensor_and_names_w0_by_its_file(tmp_path):
    model = make_model("llama")
    suite = InstrumentSuite(model, input_roles=ROLES, k=K, every_n=2, reference_dir=tmp_path)
    train(model, suite, 3)
    state = suite.state_dict()
    shapes = {tuple(tm.weight().shape) for tm in suite.tracked}
    families = {keys.family(k) for k in state}
    assert families <= {keys.COV_IN, keys.COV_OUT, keys.FROZEN_IN, keys.CURVE_IN, keys.CURVE_MASS, keys.WEIGHTS,
                        keys.META}
    for key, value in state.items():
        if keys.family(key) not in (keys.COV_IN, keys.COV_OUT):
            assert tuple(value.shape) not in shapes and value.numel() * value.element_size() <= 8192, key
    digest = bytes(state[DIGEST_KEY].tolist())
    assert (tmp_path / file_name(digest)).is_file()
    small = sum(v.numel() * v.element_size() for k, v in state.items() if keys.family(k) not in (keys.COV_IN,
                                                                                                   keys.COV_OUT))
    assert small < 32 * 1024  # generator state, frozen bases (n x k), k-curves, digest; weights here: 80 KiB


def test_resume_finds_w0_by_digest_and_refuses_a_missing_file(tmp_path):
    kw = dict(input_roles=ROLES, k=K, every_n=1000)
    model = make_model("llama")
    first = InstrumentSuite(model, reference_dir=tmp_path / "run", **kw)
    train(model, first, 2)
    state = first.state_dict()
    expected = first.compute(2)
    lost = InstrumentSuite(model, reference_dir=tmp_path / "other", **kw)
    with pytest.raises(FileNotFoundError, match=r"W0-[0-9a-f]{16}\.safetensors"):
        lost.load_state_dict(state)
    found = InstrumentSuite(model, reference_dir=tmp_path / "run", **kw)
    found.load_state_dict(state)
    assert found.compute(2) == expected


def test_a_state_written_before_w0_files_still_loads():
    """Checkpoints of earlier versions hold ``weights/L{i}/{r}/W0`` tensors instead of a digest."""
    kw = dict(input_roles=ROLES, k=K, every_n=1000)
    model = make_model("llama")
    start = {tm.key: tm.weight() for tm in InstrumentSuite(model, **kw).tracked}
    suite = InstrumentSuite(model, **kw)
    train(model, suite, 2)
    legacy = {k: v for k, v in suite.state_dict().items() if k != DIGEST_KEY}
    legacy.update({keys.state_key(keys.WEIGHTS, key, "W0"): w for key, w in start.items()})
    clone = InstrumentSuite(model, **kw)
    clone.load_state_dict(legacy)
    assert clone.compute(2) == suite.compute(2)


def test_lora_keeps_factors_only_and_its_low_rank_metrics_match_the_dense_formula():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                                     target_modules=["q_proj", "o_proj"]))
    suite = InstrumentSuite(model, k=K, every_n=1000, dtype=torch.float64, metric_dtype="float64")
    metrics = train(model, suite, 3, lr=5e-2)[-1]
    held = suite.held_bytes()
    factor_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    # the adapters' starting factors only: no dense W0 of a wrapped matrix, nothing for the frozen others
    assert held["reference"] == factor_bytes and held["views"] == 0, held
    tracked = {tm.key: tm for tm in suite.tracked}
    view = suite.upd.view(tracked["L0/q"], "delta", torch.float64)
    assert isinstance(view, LowRank) and view.L.shape[1] == 4  # [B, -B0]: rank 2 + 2
    module = model.get_base_model().model.layers[0].self_attn.q_proj
    BA = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double() * module.scaling["default"]
    U = geo.top_eigvecs(suite.cov.covariance_in("L0/attn_in"), K)[0]
    assert metrics["rsf_in/L0/q"] == pytest.approx(geo.relative_rsf(geo.rsf_in(BA, U), K, 32), rel=1e-9)
    z = geo.rsf_zscore(BA, geo.rsf_in(BA, U), K, "in")
    assert metrics["z_in/L0/q"] == pytest.approx(z, rel=1e-9)
    assert "rsf_in_update/L0/q" in metrics and "rsf_in_grad/L0/q" not in metrics


def test_top_k_solver_and_hutchpp_agree_with_the_dense_path():
    """dense_max_dim=0 sends every covariance through the top-k solver and every z-score through Hutch++:
    relative RSF within 1e-4 of the full eigh where the eigengap at k is at least 1e-3 (every one here),
    spikiness shares within 1e-5, z-scores within 5%; erank only where the full spectrum was computed."""
    model = make_model("llama")
    suite = InstrumentSuite(model, input_roles=ROLES, k=K, every_n=1000, metric_dtype="float64")
    train(model, suite, 3)
    dense = suite.compute(3)
    suite.config.dense_max_dim = 0
    suite.config.full_spectrum_every = 1000
    top = suite.compute(3)
    assert top.keys() <= dense.keys()
    assert not [k for k in top if k.endswith("/erank")]
    checked = 0
    for key, value in dense.items():
        family = keys.family(key)
        if family.startswith("rsf_") and key in top:
            parsed = keys.parse(key)
            gap = dense.get(keys.metric("gap_in", parsed.layer, parsed.name)) if family.startswith("rsf_in") else 1.0
            if gap is None or gap >= 1e-3:
                assert top[key] == pytest.approx(value, rel=1e-4), key
                checked += 1
        elif family.startswith("spike_") and not key.endswith("erank"):
            assert top[key] == pytest.approx(value, rel=1e-5), key
        elif family.startswith("z_") and "/all/" not in key:
            assert top[key] == pytest.approx(value, rel=0.05, abs=0.05), key
    assert checked > 50


def test_deepspeed_zero3_weights_are_refused_with_the_supported_path_named():
    model = make_model("llama")
    model.model.layers[1].mlp.down_proj.weight.ds_id = 7  # what ZeRO-3 puts on the parameters it partitions
    with pytest.raises(RuntimeError, match="L1/down: DeepSpeed ZeRO-3.*FSDP2"):
        InstrumentSuite(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("gram_max_dim", [4096, 0])
def test_the_wide_prediction_operator_spans_the_dense_subspace(arch, gram_max_dim, monkeypatch):
    """Above dense_max_dim the prediction subspace is solved without copying W_U, through the Gram or
    matrix-free (GRAM_MAX_DIM), with the family's gain (Gemma: 1 + w) and LayerNorm centring (GPT-2):
    the same top-k subspace as the dense path's eigh of (W_U diag(g))^T (W_U diag(g))."""
    from weightgeom.hooks import measurement  # noqa: PLC0415

    monkeypatch.setattr(measurement, "GRAM_MAX_DIM", gram_max_dim)
    model = make_model(arch)
    if arch == "gemma":
        with torch.no_grad():
            model.model.norm.weight.normal_(0.0, 0.5)  # Gemma's norms start at 0: give the gain a shape
    suite = InstrumentSuite(model, k=K, every_n=1000, metric_dtype="float64")
    spans = []
    for dense_max_dim in (10**6, 0):
        suite.config.dense_max_dim = dense_max_dim
        m = measurement.Measurement(step=1, k=K, zscores=False, dtype=torch.float64, cov=suite.cov, upd=suite.upd,
                                    tracked=suite.tracked, input_roles=suite.input_roles, frozen={}, model=model,
                                    dense_max_dim=dense_max_dim)
        V, svals = m.prediction(K)
        spans.append((V @ V.T, svals[: K + 1]))
    # the wide path's products are fp32 on the live weights: ~1e-7; a wrong gain or centring moves it by O(0.1)
    torch.testing.assert_close(spans[1][0], spans[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(spans[1][1], spans[0][1], rtol=1e-6, atol=0)
