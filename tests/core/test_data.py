import json
import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl.data_utils import apply_chat_template

from tests.tiny import tiny_tokenizer
from weightgeom.core.data import (
    PreferenceStats,
    batch_indices,
    build_embedded_preferences,
    identical_after_truncation,
    load_preference_pairs,
    load_texts,
    render_pairs,
    tokenize_pairs,
)
from weightgeom.core.shards import load_corpus
from weightgeom.core.tokenizer import train_stdlib_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_stdlib_tokenizer(400, tmp_path_factory.mktemp("tok"), max_bytes=200_000)


@pytest.fixture(scope="module")
def stdlib_texts():
    return load_texts("stdlib", max_docs=40)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- load_texts -------------------------------------------------------------------------------


def test_load_texts_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nstill first doc\n")
    write_jsonl(tmp_path / "b.jsonl", [{"body": "jsonl one", "n": 1}, {"body": "jsonl two", "n": 2}])
    (tmp_path / "c.json").write_text(json.dumps([{"body": "json one"}, {"body": "   "}]))
    Dataset.from_list([{"body": "parquet one"}, {"body": None}]).to_parquet(str(tmp_path / "d.parquet"))

    assert load_texts(str(tmp_path / "a.txt")) == ["first doc\n\nstill first doc\n"]
    assert load_texts(str(tmp_path / "b.jsonl"), text_field="body") == ["jsonl one", "jsonl two"]
    # Whitespace-only and missing values are dropped.
    assert load_texts(str(tmp_path / "c.json"), text_field="body") == ["json one"]
    assert load_texts(str(tmp_path / "d.parquet"), text_field="body") == ["parquet one"]
    # A list of sources concatenates; a directory is read recursively in path order.
    both = load_texts([str(tmp_path / "b.jsonl"), str(tmp_path / "d.parquet")], text_field="body")
    assert both == ["jsonl one", "jsonl two", "parquet one"]
    sub = tmp_path / "dir" / "nested"
    sub.mkdir(parents=True)
    (tmp_path / "dir" / "z.txt").write_text("z")
    (sub / "y.txt").write_text("y")
    assert load_texts(str(tmp_path / "dir")) == ["y", "z"]
    assert load_texts(str(tmp_path / "b.jsonl"), text_field="body", max_docs=1) == ["jsonl one"]


def test_load_texts_stdlib(stdlib_texts):
    assert len(stdlib_texts) == 40
    assert all(t.strip() for t in stdlib_texts)
    assert any("def " in t for t in stdlib_texts)


def test_load_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'"):
        load_texts(str(tmp_path / "x.csv"))
    write_jsonl(tmp_path / "f.jsonl", [{"content": "hi", "id": 3}])
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content', 'id'\]"):
        load_texts(str(tmp_path / "f.jsonl"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_texts(str(tmp_path / "blank.txt"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_texts(str(empty_dir))
    write_jsonl(tmp_path / "n.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(ValueError, match=r"n\.jsonl: line 1: column 'text' holds int, expected a string"):
        load_texts(str(tmp_path / "n.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 1 is not valid JSON"):
        load_texts(str(tmp_path / "broken.jsonl"))


# --- LM blocks (weightgeom.core.shards; more in test_shards.py) ---------------------------------------


def corpus_cfg(source, seq_len, eval_fraction=0.05, max_tokens=None):
    return SimpleNamespace(source=str(source), text_field="text", seq_len=seq_len, eval_fraction=eval_fraction,
                           max_tokens=max_tokens)


def test_blocks_pack_docs_with_eos_and_split_by_document(tokenizer, tmp_path):
    texts = [f"doc {i}: " + "alpha beta gamma\n" * (i + 1) + "def f(x):\n    return x\n" * (i % 3) for i in range(20)]
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    seq_len = 16
    train, evals = load_corpus(corpus_cfg(tmp_path / "c.jsonl", seq_len, 0.2), tokenizer, 3, tmp_path / "cache")
    assert train[0:1].dtype == torch.long and train.shape[1] == evals.shape[1] == seq_len
    docs = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for t in texts]
    held_out = []
    for blocks, shuffled in ((train, False), (evals, True)):
        stream = blocks.tokens.read(0, len(blocks.tokens)).tolist()  # the split's whole token stream
        split_docs = _split_on(stream, tokenizer.eos_token_id)
        assert split_docs == [d for d in docs if d in split_docs]  # whole documents + eos, in corpus order
        n = len(stream) // seq_len
        expected = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
        got = blocks[0:len(blocks)]
        assert len(blocks) == n >= 1
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
        assert torch.equal(got, expected) != shuffled  # eval blocks come in a seeded order
        held_out.append(set(split_docs))
    assert not held_out[0] & held_out[1] and held_out[0] | held_out[1] == set(docs)  # no document in both
    assert 0.2 * sum(map(len, docs)) <= sum(map(len, held_out[1])) < 0.4 * sum(map(len, docs))


def _split_on(stream: list[int], eos: int) -> list[tuple[int, ...]]:
    out, cur = [], []
    for t in stream:
        cur.append(t)
        if t == eos:
            out.append(tuple(cur))
            cur = []
    assert not cur
    return out


def test_blocks_deterministic_and_leave_global_rng(tokenizer, tmp_path):
    cfg = corpus_cfg("stdlib", 32, 0.05, max_tokens=8000)
    state = torch.get_rng_state()
    a = load_corpus(cfg, tokenizer, 1, tmp_path / "c1")
    assert torch.equal(torch.get_rng_state(), state)
    b = load_corpus(cfg, tokenizer, 1, tmp_path / "c2")  # prepared afresh in another cache
    c = load_corpus(cfg, tokenizer, 2, tmp_path / "c1")
    for x, y in zip(a, b):
        assert torch.equal(x[0 : len(x)], y[0 : len(y)])
    assert not torch.equal(a[1][0 : len(a[1])], c[1][0 : len(c[1])])  # another seed: other eval blocks or order
    assert len(a[0].tokens) + len(a[1].tokens) == 8000


def test_blocks_eval_edge_cases_and_errors(tokenizer, tmp_path):
    write_jsonl(tmp_path / "w.jsonl", [{"text": f"word{i} " * 40} for i in range(6)])
    src = tmp_path / "w.jsonl"
    train, evals = load_corpus(corpus_cfg(src, 8, 0.0), tokenizer, 0, tmp_path / "c")
    assert evals.shape == (0, 8) and len(evals) == 0 and train.shape[0] >= 2
    train, evals = load_corpus(corpus_cfg(src, 8, 0.001), tokenizer, 0, tmp_path / "c")
    assert len(evals) >= 1 and evals.tokens.n_documents == 1  # a tiny fraction still holds out one document
    with pytest.raises(ValueError, match="too small for seq_len=4096"):
        load_corpus(corpus_cfg(src, 4096, 0.0), tokenizer, 0, tmp_path / "c")
    with pytest.raises(ValueError, match="eval_fraction"):
        load_corpus(corpus_cfg(src, 8, 1.0), tokenizer, 0, tmp_path / "c")


# --- batch order ------------------------------------------------------------------------------


def test_batch_indices_epochs_cover_every_item_once():
    n, bs = 10, 4
    stream = torch.cat([batch_indices(n, bs, step, seed=7) for step in range(10)])  # 40 = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a new permutation each epoch
    # Step 2 spans the epoch boundary: 2 items from epoch 0's tail, 2 from epoch 1's head.
    assert batch_indices(n, bs, 2, seed=7).tolist() == stream[8:12].tolist()


def test_batch_indices_resume_is_exact_and_rng_free():
    state = torch.get_rng_state()
    looped = [batch_indices(13, 5, step, seed=1) for step in range(30)]
    assert torch.equal(torch.get_rng_state(), state)
    for k in (0, 7, 29):
        assert torch.equal(batch_indices(13, 5, k, seed=1), looped[k])
    assert not torch.equal(batch_indices(13, 5, 0, seed=2), looped[0])
    big = batch_indices(3, 7, 0, seed=0)  # batch larger than the dataset spans several epochs
    assert big.shape == (7,) and Counter(big[:6].tolist()) == Counter([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError):
        batch_indices(0, 4, 0, 0)


# --- preference files -------------------------------------------------------------------------


def test_preference_plain_jsonl_and_parquet(tmp_path):
    rows = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "extra": 1},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome", "extra": 2},
    ]
    pairs, stats = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    assert stats == PreferenceStats(n_rows=2, n_valid=2, n_identical_dropped=0, conversational=False)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert load_preference_pairs(tmp_path / "p.parquet")[0] == pairs


def test_preference_conversational_is_flattened(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
    ]
    pairs, stats = load_preference_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert stats.conversational
    assert pairs == [
        {
            "prompt": "system: Be brief.\nuser: Hi?\n",
            "chosen": "assistant: Hello.\n",
            "rejected": "assistant: Go away.\n",
        }
    ]


def test_preference_identical_pairs_counted_and_dropped(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
    ]
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        pairs, stats = load_preference_pairs(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [p["chosen"] for p in pairs] == ["good"]
    assert (stats.n_rows, stats.n_valid, stats.n_identical_dropped) == (2, 1, 1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no valid preference pair"):
        load_preference_pairs(write_jsonl(tmp_path / "all.jsonl", rows[:1]))


def test_preference_errors(tmp_path):
    missing = r"missing column\(s\) \['rejected'\]; found columns \['prompt', 'chosen'\]"
    with pytest.raises(ValueError, match=missing):
        load_preference_pairs(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "c"}]))
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3
    rows += [{"prompt": "p", "chosen": " ", "rejected": "r"}, {"prompt": "", "chosen": "c", "rejected": "r"}]
    empty = r"e.jsonl: empty fields.*'prompt' in 1 row\(s\), first \[4\].*'chosen' in 1 row\(s\), first \[3\]"
    with pytest.raises(ValueError, match=empty):
        load_preference_pairs(write_jsonl(tmp_path / "e.jsonl", rows))
    bad_msg = [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
    ]
    with pytest.raises(ValueError, match="column 'chosen', row 1, message 0"):
        load_preference_pairs(write_jsonl(tmp_path / "b.jsonl", bad_msg))
    mixed = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": ["c"], "rejected": "r"}]
    with pytest.raises(ValueError, match="column 'chosen', row 1: expected a string"):
        load_preference_pairs(write_jsonl(tmp_path / "x.jsonl", mixed))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preference_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown extension"):
        load_preference_pairs(tmp_path / "p.txt")


# --- embedded preferences ---------------------------------------------------------------------


def test_embedded_preferences_shape_and_determinism(stdlib_texts):
    state = torch.get_rng_state()
    pairs = build_embedded_preferences(stdlib_texts, 30, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert pairs == build_embedded_preferences(stdlib_texts, 30, seed=0)
    assert pairs != build_embedded_preferences(stdlib_texts, 30, seed=1)
    assert len(pairs) == 30 and len({p["prompt"] for p in pairs}) == 30
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert sorted(p["chosen"]) == sorted(p["rejected"])  # same characters, new order
        assert re.split(r"\S+", p["chosen"]) == re.split(r"\S+", p["rejected"])  # same layout
        assert len(p["prompt"]) == 200 and not p["prompt"][-1].isspace() and len(p["chosen"]) <= 121
        assert p["chosen"].startswith("\n") and p["rejected"].startswith("\n")  # prompt ends on a token boundary
        assert any(p["prompt"] + p["chosen"] in t for t in stdlib_texts)  # a true continuation


def test_embedded_prompts_never_end_in_whitespace():
    """A prompt ending in a blank line or trailing spaces merges with the completion's leading
    newline (TRL then warns "the tokenized prompt is not a prefix"): such split points are skipped."""
    line = "x = compute(value)\n"
    text = (line + "\n" + "y = other   \n" + line * 3) * 40  # blank lines and trailing spaces everywhere
    pairs = build_embedded_preferences([text], 40, seed=0, prompt_chars=30, completion_chars=40)
    assert all(not p["prompt"][-1].isspace() for p in pairs)


def _char_ngram_logprob(counts: Counter, context_counts: Counter, text: str, history: str, n: int) -> float:
    """Add-one smoothed character n-gram log-likelihood of `text` after `history`."""
    full, total = history + text, 0.0
    for i in range(len(history), len(full)):
        ctx = full[i - n + 1 : i]
        total += math.log((counts[ctx + full[i]] + 1) / (context_counts[ctx] + 256))
    return total


def test_embedded_preferences_carry_a_learnable_signal(stdlib_texts):
    """A character 6-gram fit on the corpus prefers the true continuation in most pairs."""
    n = 6
    counts, context_counts = Counter(), Counter()
    for t in stdlib_texts:
        for i in range(n - 1, len(t)):
            counts[t[i - n + 1 : i + 1]] += 1
            context_counts[t[i - n + 1 : i]] += 1
    pairs = build_embedded_preferences(stdlib_texts, 40, seed=0)
    wins = sum(
        _char_ngram_logprob(counts, context_counts, p["chosen"], p["prompt"], n)
        > _char_ngram_logprob(counts, context_counts, p["rejected"], p["prompt"], n)
        for p in pairs
    )
    assert wins >= 36


def test_embedded_preferences_errors():
    with pytest.raises(ValueError, match="no document is longer"):
        build_embedded_preferences(["short\ntext\n"], 1)
    with pytest.raises(ValueError, match="built only"):
        build_embedded_preferences(["x" * 400], 2)  # no newline: no line-aligned split exists


# --- tokenize_pairs ---------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (ord), pad 0, eos 1: makes mask positions easy to read."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(ch) for ch in t] for t in texts]}


def test_tokenize_pairs_masks_on_hand_example():
    pairs = [{"prompt": "ab", "chosen": "cd", "rejected": "xyz"}]
    out = tokenize_pairs(pairs, CharTokenizer(), max_len=16)
    a, b, c, d, x, y, z = map(ord, "abcdxyz")
    # width = longest row: ab + xyz + eos = 6
    assert out["chosen_input_ids"].tolist() == [[a, b, c, d, 1, 0]]
    assert out["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert out["chosen_loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0]]
    assert out["rejected_input_ids"].tolist() == [[a, b, x, y, z, 1]]
    assert out["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1]]
    assert out["rejected_loss_mask"].tolist() == [[0, 0, 1, 1, 1, 1]]
    assert all(v.dtype == torch.long for v in out.values())
    no_eos = tokenize_pairs(pairs, CharTokenizer(), max_len=16, append_eos=False)
    assert no_eos["chosen_loss_mask"].tolist() == [[0, 0, 1, 1, 0]]


def test_tokenize_pairs_truncation():
    pairs = [{"prompt": "0123456789", "chosen": "abcdefgh", "rejected": "ab"}]
    out = tokenize_pairs(pairs, CharTokenizer(), max_len=8)
    # Completion (9 with eos) is long: the prompt keeps its last max_len // 2 = 4 tokens, shared
    # by both sides; the completions are cut from the right to the remaining 4.
    assert out["chosen_input_ids"].tolist() == [list(map(ord, "6789abcd"))]
    assert out["rejected_input_ids"].tolist() == [[*map(ord, "6789ab"), 1, 0]]
    assert out["chosen_loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    short_pairs = [{"prompt": "0123456789", "chosen": "ab", "rejected": "c"}]
    short = tokenize_pairs(short_pairs, CharTokenizer(), max_len=8)
    # Short completions: the prompt is cut from the left only as far as needed.
    assert short["chosen_input_ids"].tolist() == [[*map(ord, "56789ab"), 1]]


def test_tokenize_pairs_real_tokenizer_round_trip(tokenizer):
    pairs = [{"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "return\n    a + b\n"}]
    out = tokenize_pairs(pairs, tokenizer, max_len=64)
    for side in ("chosen", "rejected"):
        ids, loss = out[f"{side}_input_ids"][0], out[f"{side}_loss_mask"][0].bool()
        assert tokenizer.decode(ids[loss]) == pairs[0][side] + tokenizer.eos_token
        assert tokenizer.decode(ids[out[f"{side}_attention_mask"][0].bool() & ~loss]) == pairs[0]["prompt"]


# --- issue 19: pairs the truncation makes identical; columnar JSON; a byte order mark ------------------------

def test_pairs_identical_after_truncation_are_found_on_a_hand_example():
    pairs = [{"prompt": "0123456789", "chosen": "abcdXY", "rejected": "abcdZW"},  # differ only past max_len
             {"prompt": "0123456789", "chosen": "abXY", "rejected": "abZW"},  # differ inside it
             {"prompt": "01", "chosen": "abc", "rejected": "abc!"}]  # eos lands where '!' is: they differ
    assert identical_after_truncation(pairs, CharTokenizer(), max_len=8) == [0]
    out = tokenize_pairs(pairs[:1], CharTokenizer(), max_len=8)  # what a trainer would see: no preference left
    assert torch.equal(out["chosen_input_ids"], out["rejected_input_ids"])
    assert identical_after_truncation(pairs, CharTokenizer(), max_len=12) == []


def test_preference_columnar_json_is_read_as_rows(tmp_path):
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": [" x", " y"], "rejected": [" u", " v"]}))
    pairs, stats = load_preference_pairs(path)
    assert pairs == [{"prompt": "a", "chosen": " x", "rejected": " u"},
                     {"prompt": "b", "chosen": " y", "rejected": " v"}]
    assert stats.n_rows == 2 and not stats.conversational
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": [" x"], "rejected": [" u", " v"]}))
    with pytest.raises(ValueError, match="lists differ in length"):
        load_preference_pairs(path)
    one = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    path.write_text(json.dumps(one))  # one conversational row in an object, not columns
    pairs, stats = load_preference_pairs(path)
    assert stats.conversational and pairs == [{"prompt": "user: hi\n", "chosen": "assistant: yes\n",
                                               "rejected": "assistant: no\n"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_preference_files_accept_a_byte_order_mark_as_corpora_do(tmp_path, suffix):
    rows = [{"prompt": "a", "chosen": " x", "rejected": " u"}, {"prompt": "b", "chosen": " y", "rejected": " v"}]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    pairs, _ = load_preference_pairs(path)
    assert pairs == rows
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello"}).encode() + b"\n")
    assert load_texts(str(corpus)) == ["hello"]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CONVERSATION = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}


def templated_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_conversational_pairs_render_through_the_chat_template_as_trl_renders_them(tmp_path):
    pairs, stats = load_preference_pairs(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]), keep_messages=True)
    assert stats.conversational and pairs == [CONVERSATION]  # kept as messages until a tokenizer renders them
    tokenizer = templated_tokenizer()
    rendered = render_pairs(pairs, tokenizer)
    assert rendered == [apply_chat_template(CONVERSATION, tokenizer)]
    assert rendered[0]["prompt"].endswith("<|assistant|> ") and rendered[0]["chosen"] == "Hello. <|end|>\n"
    # an assistant turn last in the prompt is continued, not closed (TRL's continue_final_message)
    prefill = {**CONVERSATION, "prompt": CONVERSATION["prompt"] + [{"role": "assistant", "content": "Well,"}]}
    assert render_pairs([prefill], tokenizer) == [apply_chat_template(prefill, tokenizer)]


def test_without_a_chat_template_messages_are_flattened_and_plain_pairs_pass_through():
    plain = {"prompt": "p", "chosen": "c", "rejected": "r"}
    assert render_pairs([CONVERSATION, plain], tiny_tokenizer()) == [
        {"prompt": "system: Be brief.\nuser: Hi?\n", "chosen": "assistant: Hello.\n",
         "rejected": "assistant: Go away.\n"}, plain]
    assert render_pairs([CONVERSATION], None) == render_pairs([CONVERSATION], tiny_tokenizer())
