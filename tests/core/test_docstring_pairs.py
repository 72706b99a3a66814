import json
import re
import statistics
import sysconfig
from collections import Counter

import pytest

from weightgeom.core.data import load_preference_pairs
from weightgeom.core.docstring_pairs import (
    QUESTION,
    build_docstring_preferences,
    docstring_candidates,
    docstring_summary,
)

STDLIB = sysconfig.get_paths()["stdlib"]
ASKED = re.compile(r"What does `([\w.]+)` do\?")


@pytest.fixture(scope="module")
def candidates():
    return {c.name: c for c in docstring_candidates(STDLIB)}


@pytest.fixture(scope="module")
def pairs():
    return build_docstring_preferences(256, seed=0)


def asked_name(pair):
    match = ASKED.fullmatch(pair["prompt"][0]["content"])
    assert match, pair["prompt"]
    return match.group(1)


def text(pair, field):
    return pair[field][0]["content"]


# --- the real stdlib ---------------------------------------------------------------------------


def test_pairs_are_conversational_messages(pairs):
    assert len(pairs) == 256
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        assert [m["role"] for m in pair["chosen"]] == ["assistant"]
        assert [m["role"] for m in pair["rejected"]] == ["assistant"]
        for field in pair.values():
            assert set(field[0]) == {"role", "content"}
            assert isinstance(field[0]["content"], str) and field[0]["content"].strip()
    # Functions are asked without replacement.
    assert len({asked_name(p) for p in pairs}) == len(pairs)


def test_deterministic_given_seed_and_seed_sensitive():
    a = build_docstring_preferences(32, seed=0)
    assert a == build_docstring_preferences(32, seed=0)
    b = build_docstring_preferences(32, seed=1)
    assert [asked_name(p) for p in a] != [asked_name(p) for p in b]


def test_chosen_is_the_asked_functions_own_summary(pairs, candidates):
    for pair in pairs:
        assert text(pair, "chosen") == candidates[asked_name(pair)].summary
    # A known one, named by import path (json/__init__.py -> json.dumps).
    assert candidates["json.dumps"].summary == "Serialize ``obj`` to a JSON formatted ``str``."
    assert candidates["json.dumps"].module == "json"
    # posixpath reads as os.path; private modules, ntpath and tests are not candidates.
    assert candidates["os.path.basename"].summary == "Returns the final component of a pathname"
    assert not any(n.startswith(("posixpath.", "ntpath.")) for n in candidates)
    assert not any(part.startswith("_") for n in candidates for part in n.split("."))
    assert not any(".test." in f".{n}" or n.startswith("idlelib.") for n in candidates)


def test_candidate_summaries_read_as_sentences(candidates):
    summaries = [c.summary for c in candidates.values()]
    assert len(summaries) == len(set(summaries)) >= 500
    for s in summaries:
        assert 20 <= len(s) <= 200 and s == " ".join(s.split())
        assert ">>>" not in s and "->" not in s and not re.match(r"[\w.]+\s*\(", s)
        assert "deprecated" not in s.lower()


def test_rejected_is_another_packages_summary_not_naming_the_asked_function(pairs, candidates):
    by_summary = {c.summary: c for c in candidates.values()}
    for pair in pairs:
        name = asked_name(pair)
        rejected = text(pair, "rejected")
        assert rejected != text(pair, "chosen")
        other = by_summary[rejected]  # some other function's real summary
        assert other.package != candidates[name].package
        assert not re.search(rf"\b{re.escape(name.rsplit('.', 1)[-1])}\b", rejected, re.IGNORECASE)


def test_rejected_matches_chosen_in_length(pairs):
    ratios = [abs(len(text(p, "chosen")) - len(text(p, "rejected"))) / len(text(p, "chosen")) for p in pairs]
    assert statistics.median(ratios) < 0.1
    # Without the length matching (one draw) the median ratio is ~0.4: the check above has teeth.
    unmatched = build_docstring_preferences(256, seed=0, n_candidates=1)
    loose = [abs(len(text(p, "chosen")) - len(text(p, "rejected"))) / len(text(p, "chosen")) for p in unmatched]
    assert statistics.median(loose) > 0.25


def test_each_summary_is_rejected_a_bounded_number_of_times():
    for bound in (1, 2):
        uses = Counter(text(p, "rejected") for p in build_docstring_preferences(400, seed=3, max_rejected_uses=bound))
        assert max(uses.values()) <= bound


def test_too_many_pairs_says_how_many_are_available(candidates):
    n = len(candidates)
    assert len(build_docstring_preferences(n, seed=0)) == n
    with pytest.raises(ValueError, match=rf"asked for {n + 1} .* only {n} functions"):
        build_docstring_preferences(n + 1)
    with pytest.raises(ValueError, match="n_pairs >= 1"):
        build_docstring_preferences(0)


def test_candidates_are_cached_per_process():
    assert docstring_candidates(STDLIB) is docstring_candidates(STDLIB)


def test_pairs_load_through_the_project_reader(pairs, tmp_path):
    path = tmp_path / "docstring_pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs[:40]))
    loaded, stats = load_preference_pairs(path)
    assert stats.conversational
    assert stats.n_rows == stats.n_valid == 40 and stats.n_identical_dropped == 0
    assert loaded[0]["prompt"] == f"user: {QUESTION.format(name=asked_name(pairs[0]))}\n"
    assert loaded[0]["chosen"] == f"assistant: {text(pairs[0], 'chosen')}\n"


# --- the rules, on a small fake stdlib ---------------------------------------------------------


def test_summary_rules():
    assert docstring_summary("Join two   paths\n    into one.\n\n    More text.", "join") == "Join two paths into one."
    assert docstring_summary("dumps(obj) -> str\n\nSerialize obj.", "dumps") is None
    assert docstring_summary("os.path.join(a, *p) joins paths together", "join") is None
    assert docstring_summary("Return x.\n>>> f(1)\n1", "f") is None
    assert docstring_summary("Deprecated alias of something else.", "f") is None
    assert docstring_summary("Too short.", "f") is None
    assert docstring_summary("x" * 201, "f") is None
    assert docstring_summary("Accepts these keyword arguments:", "f") is None
    assert docstring_summary(None, "f") is None


def write(root, rel, source):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def fn(name, doc, decorator=""):
    return f"{decorator}\ndef {name}():\n    '''{doc}'''\n\n"


def test_module_rules_on_a_fake_stdlib(tmp_path):
    write(tmp_path, "pkg/__init__.py", fn("top", "Return the top of the package."))
    write(tmp_path, "pkg/sub.py", fn("inner", "Compute the inner value of it.") + fn("_hidden", "A private helper."))
    write(tmp_path, "pkg/_private.py", fn("leak", "Should never be asked about."))
    write(tmp_path, "_priv/mod.py", fn("leak2", "Should never be asked about 2."))
    write(tmp_path, "test/test_x.py", fn("tested", "Test functions are skipped."))
    write(tmp_path, "posixpath.py", fn("join", "Join two or more pathname components."))
    write(tmp_path, "ntpath.py", fn("join", "Join two or more Windows path parts."))
    write(tmp_path, "exported.py", "__all__ = ['listed']\n" + fn("listed", "Listed in the module's all.")
          + fn("unlisted", "Public but not exported by all."))
    write(tmp_path, "deco.py", fn("Special", "A special form, not a function.", "@_SpecialForm")
          + fn("managed", "A context manager over a resource.", "@contextlib.contextmanager"))
    write(tmp_path, "dup_a.py", fn("same", "Exactly the same summary text."))
    write(tmp_path, "dup_b.py", fn("same", "Exactly the same summary text."))
    write(tmp_path, "broken.py", "def (:\n")
    names = {c.name: c.module for c in docstring_candidates(str(tmp_path.resolve()))}
    assert names == {
        "deco.managed": "deco", "exported.listed": "exported", "os.path.join": "os.path",
        "pkg.top": "pkg", "pkg.sub.inner": "pkg.sub",
    }
    # Only pkg.* would remain as rejected for os.path.join etc.; pkg's two are each other's package.
    pairs = build_docstring_preferences(5, seed=0, stdlib=tmp_path)
    for pair in pairs:
        name = asked_name(pair)
        assert text(pair, "rejected") != text(pair, "chosen")
        assert name.split(".")[0] != {
            "Listed in the module's all.": "exported", "A context manager over a resource.": "deco",
            "Join two or more pathname components.": "os", "Return the top of the package.": "pkg",
            "Compute the inner value of it.": "pkg",
        }[text(pair, "rejected")]
    with pytest.raises(ValueError, match="asked for 6 docstring pairs but only 5"):
        build_docstring_preferences(6, stdlib=tmp_path)


def test_runs_out_of_rejected_summaries_with_a_clear_error(tmp_path):
    three, same = tmp_path / "three", tmp_path / "same"
    for name, doc in (("a", "The first function in module a."), ("b", "The second function in module b."),
                      ("c", "The third function in module c.")):
        write(three, f"{name}.py", fn(name, doc))
        write(same, f"pkg/{name}.py", fn(name, doc))
    # Each summary rejected at most once: 3 pairs over 3 packages still fit (a derangement).
    pairs = build_docstring_preferences(3, seed=0, stdlib=three, max_rejected_uses=1)
    assert max(Counter(text(p, "rejected") for p in pairs).values()) == 1
    # One package only: no function has a rejected from another package.
    with pytest.raises(ValueError, match=r"no rejected summary left for pkg\.\w\.\w after 0 pairs"):
        build_docstring_preferences(1, seed=0, stdlib=same)


def test_rejected_never_names_the_asked_function(tmp_path):
    write(tmp_path, "a.py", fn("join", "Join the parts into one string."))
    write(tmp_path, "b.py", fn("split", "The reverse of JOIN on strings."))  # nearest in length, names join
    write(tmp_path, "c.py", fn("other", "Return an unrelated number, with a much longer summary than the others."))
    for seed in range(5):
        pairs = build_docstring_preferences(3, seed=seed, stdlib=tmp_path)
        (ask_join,) = [p for p in pairs if asked_name(p) == "a.join"]
        assert text(ask_join, "rejected").startswith("Return an unrelated number")
