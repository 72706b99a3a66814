"""`harness compare BASE AFTER`: the static analysis of the delta between two checkpoints.

Checked here: each side's relative RSF against a brute-force recomputation (stored activations,
torch.cov, dense float64 eigh / SVD, weights cut from the raw state dict) on tiny Llama, GPT-2
(fused, transposed c_attn, tied embeddings) and GPT-NeoX (head-interleaved qkv) models; the fused
matrices are split right; identical checkpoints say "no delta"; the CLI end to end; every error;
and, on the smoke pipeline's own checkpoints, the live metrics of the alignment runs reproduced.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO
from weightgeom.core.data import load_texts
from weightgeom.core.models import build_tiny_model, load_local_model
from weightgeom.core.sinks import read_metrics
from weightgeom.core.tokenizer import stdlib_text_files, train_stdlib_tokenizer
from weightgeom.harness.cli import main
from weightgeom.harness.compare.analysis import compare
from weightgeom.harness.compare.input_covariance import sample_token_batches

D, HEADS = 32, 4
SAMPLE = dict(n_tokens=600, seq_len=48, batch_size=4)

# Where each architecture keeps what the reference needs, written out independently of weightgeom.hooks.roles.
PATHS = {
    "llama": dict(block="model.layers.{i}.", head="lm_head", norm="model.norm", layernorm=False,
                  inputs={"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
                          "down_in": "mlp.down_proj"}),
    "gpt2": dict(block="transformer.h.{i}.", head="lm_head", norm="transformer.ln_f", layernorm=True,
                 inputs={"attn_in": "attn.c_attn", "o_in": "attn.c_proj", "mlp_in": "mlp.c_fc",
                         "down_in": "mlp.c_proj"}),
    "gpt_neox": dict(block="gpt_neox.layers.{i}.", head="lm_head", norm="gpt_neox.final_layer_norm", layernorm=True,
                     inputs={"attn_in": "attention.query_key_value", "o_in": "attention.dense",
                             "mlp_in": "mlp.dense_h_to_4h", "down_in": "mlp.dense_4h_to_h"}),
}
GROUP = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
         "down": "down_in"}


def raw_matrices(model, arch: str) -> dict[str, torch.Tensor]:
    """Every role's (out, in) weight, cut by hand from the state dict (float64)."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    out = {}
    for i in range(model.config.num_hidden_layers):
        b = PATHS[arch]["block"].format(i=i)
        if arch == "llama":
            names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
            out.update({f"L{i}/{r}": sd[f"{b}{n}.weight"] for r, n in names.items()})
        elif arch == "gpt2":  # Conv1D stores (in, out); c_attn's columns are [q | k | v]
            qkv = sd[f"{b}attn.c_attn.weight"]
            out.update({f"L{i}/{r}": qkv[:, j * D:(j + 1) * D].T for j, r in enumerate("qkv")})
            out.update({f"L{i}/o": sd[f"{b}attn.c_proj.weight"].T, f"L{i}/up": sd[f"{b}mlp.c_fc.weight"].T,
                        f"L{i}/down": sd[f"{b}mlp.c_proj.weight"].T})
        else:  # NeoX: rows per head are [q_h | k_h | v_h]
            qkv = sd[f"{b}attention.query_key_value.weight"].view(HEADS, 3, D // HEADS, D)
            out.update({f"L{i}/{r}": qkv[:, j].reshape(D, D) for j, r in enumerate("qkv")})
            out.update({f"L{i}/o": sd[f"{b}attention.dense.weight"], f"L{i}/up": sd[f"{b}mlp.dense_h_to_4h.weight"],
                        f"L{i}/down": sd[f"{b}mlp.dense_4h_to_h.weight"]})
    return out


# ----- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_stdlib_tokenizer(300, tmp_path_factory.mktemp("tok"), max_bytes=200_000)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """40 documents of varied lengths (so that chunk ends are padded)."""
    files = stdlib_text_files()[:40]
    docs = [f.read_text(encoding="utf-8", errors="replace")[: 150 + (97 * i) % 1400] for i, f in enumerate(files)]
    path = tmp_path_factory.mktemp("text") / "sample.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()))
    return path


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def tiny_pair(root: Path, arch: str, tokenizer, perturb: str = "all", **kwargs) -> tuple[Path, Path]:
    """BASE = a tiny model of ``arch``; AFTER = BASE with seeded noise on every parameter
    (``perturb="all"``), on the q rows of the attention projection only (``"q"``), or none."""
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=D, num_layers=2, num_heads=HEADS,
                  max_position_embeddings=64, tie_word_embeddings=arch == "gpt2", **kwargs)
    model = build_tiny_model(arch, **kwargs)
    base = save_model(model, tokenizer, root / f"{arch}_base")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if perturb == "all":
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        elif perturb == "q":
            for block in model.base_model.h if arch == "gpt2" else model.base_model.layers:
                if arch == "gpt2":
                    block.attn.c_attn.weight[:, :D] += 0.02 * torch.randn(D, D, generator=g)
                else:
                    w = block.attention.query_key_value.weight.view(HEADS, 3, D // HEADS, D)
                    w[:, 0] += 0.02 * torch.randn(HEADS, D // HEADS, D, generator=g)
    return base, save_model(model, tokenizer, root / f"{arch}_after_{perturb}")


# ----- brute force on tiny models ---------------------------------------------------------------------------

def reference_activations(model, arch: str, batches) -> dict[str, torch.Tensor]:
    """Every input group's non-padding activations (N, n), float64, stored by plain forward hooks."""
    store: dict[str, list] = {}
    handles = []
    for i in range(model.config.num_hidden_layers):
        for group, path in PATHS[arch]["inputs"].items():
            module = model.get_submodule(PATHS[arch]["block"].format(i=i) + path)
            key = f"L{i}/{group}"
            handles.append(module.register_forward_hook(
                lambda mod, args, out, key=key: store.setdefault(key, []).append(args[0].detach())))
    model.eval()
    with torch.no_grad():
        masks = []
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
            masks.append(mask.bool())
    for h in handles:
        h.remove()
    return {key: torch.cat([a[m] for a, m in zip(acts, masks)]).double() for key, acts in store.items()}


def brute_rsf_in(dW: torch.Tensor, X: torch.Tensor, k: int) -> float:
    C = torch.cov(X.T, correction=0) + torch.outer(X.mean(0), X.mean(0))  # uncentered: E[a a^T]
    U = torch.linalg.eigh(C).eigenvectors[:, -k:]  # ascending order: the last k are the top k
    n = dW.shape[1]
    return float((dW @ U).square().sum() / dW.square().sum()) * n / k


def brute_prediction_basis(model, arch: str, k: int) -> torch.Tensor:
    W_U = model.get_submodule(PATHS[arch]["head"]).weight.detach().double()
    M = W_U * model.get_submodule(PATHS[arch]["norm"]).weight.detach().double()
    if PATHS[arch]["layernorm"]:
        M = M @ (torch.eye(D, dtype=torch.float64) - 1.0 / D)
    return torch.linalg.svd(M, full_matrices=False).Vh[:k].T


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_both_sides_match_brute_force(arch, tokenizer, text_file, tmp_path):
    base_dir, after_dir = tiny_pair(tmp_path, arch, tokenizer)
    k = 4
    result = compare(base_dir, after_dir, text=str(text_file), k=k, k_curve=(1, 2, 8), zscores=False, device="cpu",
                     **SAMPLE)
    got = result.metrics()

    base, after = load_local_model(base_dir), load_local_model(after_dir)
    deltas = {key: raw_matrices(after, arch)[key] - w for key, w in raw_matrices(base, arch).items()}
    # the same token sample (a public, seeded function); padding is present, and excluded
    batches = sample_token_batches(tokenizer, load_texts(str(text_file)), seed=0, **SAMPLE)
    assert any(not bool(mask.all()) for _, mask in batches)
    acts = reference_activations(base, arch, batches)
    n_real = sum(int(mask.sum()) for _, mask in batches)
    assert n_real == SAMPLE["n_tokens"] and result.c_a_tokens == {key: n_real for key in acts}
    if arch == "llama":  # the hooked input of q_proj is the first norm's output on the residual stream
        hidden = [base(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[0][m.bool()]
                  for ids, m in batches]
        normed = base.model.layers[0].input_layernorm(torch.cat(hidden)).double()
        torch.testing.assert_close(normed, acts["L0/attn_in"])

    V_after = brute_prediction_basis(after, arch, k)
    V_base = brute_prediction_basis(base, arch, k)
    roles = {key.split("/")[1] for key in deltas}
    expected = {"q", "k", "v", "o", "gate", "up", "down"} if arch == "llama" else {"q", "k", "v", "o", "up", "down"}
    assert roles == expected
    for key, dW in deltas.items():
        layer, role = key.split("/")
        assert got[f"delta_norm/{key}"] == pytest.approx(dW.norm().item(), rel=1e-6)
        X = acts[f"{layer}/{GROUP[role]}"]
        assert got[f"rsf_in/{key}"] == pytest.approx(brute_rsf_in(dW, X, k), rel=1e-7, abs=1e-9), key
        m = next(r for r in result.matrices if r.key == key)
        assert m.curve_in[8] == pytest.approx(brute_rsf_in(dW, X, 8), rel=1e-7), key
        assert m.curve_in[1] == pytest.approx(brute_rsf_in(dW, X, 1), rel=1e-7), key
        if role in ("o", "down"):
            expected = float((V_after.T @ dW).square().sum() / dW.square().sum()) * D / k
            alt = float((V_base.T @ dW).square().sum() / dW.square().sum()) * D / k
            assert got[f"rsf_out_pred/{key}"] == pytest.approx(expected, rel=1e-7), key
            assert got[f"rsf_out_pred_alt/{key}"] == pytest.approx(alt, rel=1e-7), key
        else:
            assert f"rsf_out_pred/{key}" not in got  # only write roles have a prediction-side RSF
    # --unembed base swaps which W_U is the headline
    swapped = compare(base_dir, after_dir, text=str(text_file), k=k, unembed="base", zscores=False, device="cpu",
                      **SAMPLE)
    for m, s in zip(result.matrices, swapped.matrices):
        assert (s.rsf_out_pred, s.rsf_out_pred_alt) == (m.rsf_out_pred_alt, m.rsf_out_pred)


@pytest.mark.parametrize("arch", ["olmo2", "gemma2"])
def test_post_norm_output_side_is_what_the_residual_stream_receives(arch, tokenizer, text_file, tmp_path):
    """OLMo2 / Gemma2 normalise o_proj's and down_proj's outputs before the residual add: the prediction-side
    RSF is that of diag(g_post) dW, with the gains (Gemma: 1 + w) of the checkpoint whose W_U is used, as live."""
    base_dir, after_dir = tiny_pair(tmp_path, arch, tokenizer)  # every parameter perturbed: gains too
    k = 4
    got = compare(base_dir, after_dir, text=str(text_file), k=k, k_curve=(1, 2), zscores=False, device="cpu",
                  **SAMPLE).metrics()
    base, after = load_local_model(base_dir), load_local_model(after_dir)
    offset = 1.0 if arch == "gemma2" else 0.0

    def gain(model, path):
        return offset + model.get_submodule(path).weight.detach().double()

    def basis(model):
        M = model.lm_head.weight.detach().double() * gain(model, "model.norm")
        return torch.linalg.svd(M, full_matrices=False).Vh[:k].T

    posts = {"o": ("self_attn.o_proj", "post_attention_layernorm"),
             "down": ("mlp.down_proj", "post_feedforward_layernorm")}
    for i in range(2):
        for role, (matrix, norm) in posts.items():
            key, block = f"L{i}/{role}", f"model.layers.{i}."
            weights = [m.get_submodule(block + matrix).weight.detach().double() for m in (after, base)]
            dW = weights[0] - weights[1]
            for model, name in ((after, "rsf_out_pred"), (base, "rsf_out_pred_alt")):
                written = gain(model, block + norm)[:, None] * dW
                expected = float((basis(model).T @ written).square().sum() / written.square().sum()) * D / k
                assert got[f"{name}/{key}"] == pytest.approx(expected, rel=1e-6), (name, key)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_qkv_is_split_into_roles(arch, tokenizer, text_file, tmp_path):
    """Noise on the q part of the fused projection only: compare sees a delta in q and nowhere else."""
    base_dir, after_dir = tiny_pair(tmp_path, arch, tokenizer, perturb="q")
    result = compare(base_dir, after_dir, text=str(text_file), k=4, device="cpu", **SAMPLE)
    for m in result.matrices:
        assert m.shape == ((D, D) if m.role in "qkvo" else (4 * D, D) if m.role == "up" else (D, 4 * D))
        if m.role == "q":
            assert m.delta_norm > 0 and m.rsf_in is not None and math.isfinite(m.z_in)
        else:
            assert m.no_delta and m.rsf_in is None and m.rsf_out_pred is None, m.key
    assert not result.no_delta


def test_identical_checkpoints_give_an_explicit_no_delta(tokenizer, tmp_path):
    base_dir, same_dir = tiny_pair(tmp_path, "llama", tokenizer, perturb="none")
    result = compare(base_dir, same_dir, k=4, device="cpu", out_dir=tmp_path / "out")
    assert result.no_delta and result.c_a_source is None  # nothing measured: no text, no tokenizer needed
    assert "no delta" in result.notes[0]
    metrics = result.metrics()
    assert metrics and all(key.startswith("delta_norm/") and value == 0.0 for key, value in metrics.items())
    assert all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())
    assert "**No delta.**" in (tmp_path / "out" / "report.md").read_text()
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["no_delta"] is True and all(m["rsf_in"] is None for m in saved["matrices"])


@pytest.mark.slow
def test_cli_end_to_end_in_a_subprocess(tokenizer, text_file, tmp_path):
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    out = tmp_path / "report"
    args = ["--text", str(text_file), "--k", "4", "--n-tokens", "600", "--seq-len", "48", "--batch-size", "4",
            "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "weightgeom", "compare", str(base_dir), str(after_dir), *args,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| role | ‖dW‖/‖W‖ | RSF_in |" in proc.stdout and f"report: {out / 'report.md'}" in proc.stdout
    for name in ("report.md", "compare.json", "rsf_per_layer.png", "rsf_k_curve_in.png", "rsf_k_curve_out.png",
                 "c_a.safetensors"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Mean over layers" in report and "**AFTER**'s unembedding" in report and "| down |" in report
    saved = json.loads((out / "compare.json").read_text())
    in_process = compare(base_dir, after_dir, text=str(text_file), k=4, device="cpu", **SAMPLE)
    assert saved["metrics"] == pytest.approx(in_process.metrics(), rel=1e-12)

    # the measured C_a, saved in snapshot format, passes back through --c-a with the same result
    proc = subprocess.run([sys.executable, "-m", "weightgeom", "compare", str(base_dir), str(after_dir), "--k", "4",
                           "--device", "cpu", "--c-a", str(out / "c_a.safetensors"),
                           "--unembed", "base", "--out", str(tmp_path / "again")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "compare.json").read_text())
    for key, value in saved["metrics"].items():
        if key.startswith(("rsf_in/", "z_in/", "gap_in/")):
            assert again["metrics"][key] == pytest.approx(value, rel=1e-9), key
    assert again["unembed"] == "base"
    assert again["metrics"]["rsf_out_pred/L0/o"] == pytest.approx(saved["metrics"]["rsf_out_pred_alt/L0/o"], rel=1e-12)


# ----- errors -------------------------------------------------------------------------------------------------

def test_error_path_is_not_a_model_dir(tokenizer, tmp_path, capsys):
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    with pytest.raises(FileNotFoundError, match=r"BASE: model path .*nowhere.* is not an existing directory"):
        compare(tmp_path / "nowhere", after_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"AFTER: model dir .*empty.* has no config.json"):
        compare(base_dir, tmp_path / "empty")
    assert main(["compare", str(base_dir), str(tmp_path / "nowhere")]) == 2
    assert "harness: error: AFTER: model path" in capsys.readouterr().err


def test_error_architectures_differ(tokenizer, tmp_path):
    llama, _ = tiny_pair(tmp_path, "llama", tokenizer, perturb="none")
    gpt2, _ = tiny_pair(tmp_path, "gpt2", tokenizer, perturb="none")
    with pytest.raises(ValueError, match="BASE is a 'llama' model but AFTER is a 'gpt2' model"):
        compare(llama, gpt2)


def test_error_shapes_differ_names_the_matrix(tokenizer, tmp_path):
    base_dir, _ = tiny_pair(tmp_path, "llama", tokenizer, perturb="none")
    wide = save_model(build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=D, num_layers=2,
                                       num_heads=HEADS, intermediate_size=64), tokenizer, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"matrix L0/gate has shape \(128, 32\) \(out, in\) in BASE but \(64, 32\)"):
        compare(base_dir, wide)
    deep = save_model(build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=D, num_layers=3,
                                       num_heads=HEADS), tokenizer, tmp_path / "deep")
    with pytest.raises(ValueError, match="AFTER has no matrix L2/q"):
        compare(deep, base_dir)


def test_error_unsupported_architecture_is_the_role_table_error(tmp_path):
    """A family with no row that the generic fallback cannot map either (BERT: post-norm encoder blocks, no
    final norm beside them; OPT, once used here, is now mapped by module names)."""
    import transformers  # noqa: PLC0415

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                     num_attention_heads=2, max_position_embeddings=32, is_decoder=True)
    bert = save_model(transformers.AutoModelForCausalLM.from_config(config), None, tmp_path / "bert")
    with pytest.raises(ValueError, match=r"no role table for architecture 'bert'.*hooks\.roles\.ARCHITECTURES"):
        compare(bert, bert)


def test_error_snapshot_that_does_not_fit(tokenizer, tmp_path):
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    good = {"cov_in/L0/attn_in/sum_outer": torch.eye(D), "cov_in/L0/attn_in/count": torch.tensor(10.0)}
    cases = {
        "no_cov": ({"weights/L0/q/W0": torch.zeros(D, D)}, r"no cov_in/L\{i\}/\{group\}/sum_outer tensors"),
        "layer": ({**good, "cov_in/L7/attn_in/sum_outer": torch.eye(D), "cov_in/L7/attn_in/count": torch.tensor(1.0)},
                  r"cov_in/L7/attn_in/sum_outer is for input group 'L7/attn_in', which this model does not have"),
        "shape": ({"cov_in/L0/attn_in/sum_outer": torch.eye(16), "cov_in/L0/attn_in/count": torch.tensor(1.0)},
                  r"cov_in/L0/attn_in/sum_outer has shape \(16, 16\), but this model's L0/attn_in is 32 wide"),
        "count": ({"cov_in/L0/attn_in/sum_outer": torch.eye(D)}, r"has no cov_in/L0/attn_in/count"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises(ValueError, match=message):
            compare(base_dir, after_dir, c_a=path, device="cpu")
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        compare(base_dir, after_dir, c_a=tmp_path / "junk.safetensors", device="cpu")
    with pytest.raises(FileNotFoundError, match="--c-a .*missing.safetensors: no such file"):
        compare(base_dir, after_dir, c_a=tmp_path / "missing.safetensors", device="cpu")
    # a fitting snapshot that measured only some groups: the others get no RSF_in, and a note says so
    save_file(good, str(tmp_path / "partial.safetensors"))
    result = compare(base_dir, after_dir, c_a=tmp_path / "partial.safetensors", k=4, zscores=False, device="cpu")
    measured = {m.key for m in result.matrices if m.rsf_in is not None}
    assert measured == {"L0/q", "L0/k", "L0/v"}
    assert any("No C_a for the input groups of" in note and "L1/q" in note for note in result.notes)
    assert not any("W0 differ" in note for note in result.notes)  # this snapshot holds no W0
    # a snapshot whose reference weights are not BASE's is used, and the report says so
    save_file({**good, "weights/L0/q/W0": torch.zeros(D, D)}, str(tmp_path / "other_w0.safetensors"))
    result = compare(base_dir, after_dir, c_a=tmp_path / "other_w0.safetensors", k=4, zscores=False, device="cpu")
    assert any("W0 differ from BASE" in note for note in result.notes)


def test_error_no_tokenizer_for_text_c_a_and_bad_options(tokenizer, tmp_path):
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    bare = save_model(load_local_model(base_dir), None, tmp_path / "bare")
    with pytest.raises(ValueError, match=r"BASE: cannot load a tokenizer .* --tokenizer DIR.*--c-a SNAPSHOT"):
        compare(bare, after_dir, device="cpu")
    result = compare(bare, after_dir, tokenizer=base_dir, k=4, zscores=False, device="cpu", **SAMPLE)
    assert result.c_a_tokens["L0/attn_in"] == SAMPLE["n_tokens"]
    for kwargs, message in (({"unembed": "before"}, "--unembed must be one of"), ({"k": 0}, "--k must be >= 1"),
                            ({"c_a_model": "x"}, "--c-a-model must be"),
                            ({"k_curve": ()}, "--k-curve needs"), ({"n_tokens": 0}, "--n-tokens must be >= 1")):
        with pytest.raises(ValueError, match=message):
            compare(base_dir, after_dir, **kwargs)
    with pytest.raises(FileNotFoundError, match="--text .*nothing.txt.* does not exist"):
        compare(base_dir, after_dir, text=str(tmp_path / "nothing.txt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_numbers(tokenizer, text_file, tmp_path):
    base_dir, after_dir = tiny_pair(tmp_path, "llama", tokenizer)
    runs = {device: compare(base_dir, after_dir, text=str(text_file), k=4, device=device, **SAMPLE).metrics()
            for device in ("cpu", "cuda")}
    assert runs["cuda"].keys() == runs["cpu"].keys()
    for key, value in runs["cpu"].items():
        assert runs["cuda"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


# ----- reproduction of the live metrics on the smoke pipeline -----------------------------------------------------

ALIGN_STEPS = 6


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The asymmetry_smoke pipeline with one TRL and one own-loop objective; geometry is computed at
    step 4 (every_n) and forced at the last step 6, and a step-3 checkpoint keeps a mid-run snapshot.
    The live metrics run in float64 (the reference mode; compare's math is float64), so reproduction is
    exact to round-off; the float32 default agrees to about 1e-5."""
    out = tmp_path_factory.mktemp("smoke")
    objectives = "[{name: dpo, loss: trl, loss_type: sigmoid}, {name: g1.00, loss: graded, grade: 1.0}]"
    assert main(["run", "asymmetry_smoke", f"output_dir={out}", "name=run", f"tokenizer.cache_dir={out / 'tok'}",
                 "stages=[pretrain, align]", f"align.objectives={objectives}", "instruments.every_n=4",
                 "instruments.metric_dtype=float64", "align.train.save_every=3", "--no-progress"]) == 0
    return out / "run"


def _live_rows(run: Path, objective: str) -> list[dict]:
    return [r for r in read_metrics(run / "align" / objective / "metrics.jsonl") if "rsf_in/all/q" in r]


def _max_error(got: dict, live: dict, prefixes: tuple[str, ...]) -> float:
    keys = [k for k in live if k.startswith(prefixes)]
    assert keys and all(k in got for k in keys), sorted(set(keys) - set(got))
    return max(abs(got[k] - live[k]) for k in keys)


@pytest.mark.slow
def test_the_alignment_phases_share_one_w0_file(smoke_run):
    """Both objectives (TRL's and our loop) start from the same pretrained checkpoint: one W0 file on
    disk, hard-linked into each phase's instruments folder; the CE phase, from other weights, has its own."""
    files = {o: list((smoke_run / "align" / o / "instruments").glob("W0-*.safetensors")) for o in ("dpo", "g1.00")}
    assert all(len(found) == 1 for found in files.values()), files
    dpo, g1 = files["dpo"][0].stat(), files["g1.00"][0].stat()
    assert files["dpo"][0].name == files["g1.00"][0].name and dpo.st_ino == g1.st_ino and dpo.st_nlink == 2
    (pretrain,) = (smoke_run / "pretrain" / "instruments").glob("W0-*.safetensors")
    assert pretrain.name != files["dpo"][0].name and pretrain.stat().st_nlink == 1


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["g1.00", "dpo"])
def test_reproduces_the_live_final_metrics_of_an_alignment_run(smoke_run, objective):
    base = smoke_run / "pretrain" / "checkpoints" / "step_0000030"
    after = smoke_run / "align" / objective / "checkpoints" / f"step_{ALIGN_STEPS:07d}"
    snapshot = smoke_run / "align" / objective / "instruments" / f"step_{ALIGN_STEPS:07d}.safetensors"
    rows = _live_rows(smoke_run, objective)
    # the last compute fired at the last step; an earlier one (step 4) exists and must NOT be what we match
    assert [r["step"] for r in rows] == [4, ALIGN_STEPS]
    earlier, live = rows

    # what the live metric used: W0 = the phase-start fp32 weights = BASE (the W0 file the snapshot names by its
    # digest); W_U at the final compute = AFTER's (shown below: BASE's does not reproduce)
    state = load_file(str(snapshot))
    base_model = load_local_model(base)
    from weightgeom.harness.compare.analysis import snapshot_reference  # noqa: PLC0415
    from weightgeom.hooks.roles import resolve_tracked  # noqa: PLC0415

    tracked = resolve_tracked(base_model)
    w0, where = snapshot_reference(state, snapshot, [tm.key for tm in tracked])
    assert w0 is not None and "W0-" in where, where  # TRL's phase too: its W0 file sits beside its snapshots
    for tm in tracked:
        assert torch.equal(w0(tm.key), tm.weight()), tm.key

    # output side, C_a measured on text: the prediction subspace does not depend on C_a
    text = compare(base, after, k=4, seed=0, n_tokens=2048, seq_len=32, device="cpu").metrics()
    assert _max_error(text, live, ("rsf_out_pred/", "z_out_pred/", "gap_pred")) <= 1e-6
    assert _max_error(text, earlier, ("rsf_out_pred/",)) > 1e-3

    # input side with the run's final snapshot: the live rsf_in, z_in and gap_in
    snap = compare(base, after, k=4, seed=0, c_a=snapshot, device="cpu").metrics()
    assert _max_error(snap, live, ("rsf_in/", "z_in/", "gap_in/")) <= 1e-6
    assert _max_error(snap, live, ("rsf_out_pred/", "z_out_pred/", "gap_pred")) <= 1e-6
    # a mid-run snapshot's C_a (step 3) is not what the final metric used
    mid = smoke_run / "align" / objective / "checkpoints" / "step_0000003" / "instruments.safetensors"
    if mid.is_file():  # our loop saves mid-run checkpoints; TRL objectives do not
        mid_metrics = compare(base, after, k=4, zscores=False, c_a=mid, device="cpu").metrics()
        assert _max_error(mid_metrics, live, ("rsf_in/",)) > 1e-6

    # BASE's W_U (the other choice) does not reproduce the live number: AFTER's is the one it used
    other = compare(base, after, k=4, zscores=False, c_a=snapshot, unembed="base", device="cpu").metrics()
    assert _max_error(other, live, ("rsf_out_pred/",)) > 1e-6
    assert _max_error({k.replace("_alt", ""): v for k, v in snap.items() if "_alt/" in k}, other,
                      ("rsf_out_pred/",)) == 0.0
