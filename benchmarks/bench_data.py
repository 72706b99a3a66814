"""Prepare time and memory of token shards as the corpus grows (10 M -> 200 M tokens).

    python benchmarks/bench_data.py                              # sizes 10,50,100,200 M tokens, num_proc 1
    python benchmarks/bench_data.py --sizes 10,50 --num-proc 1,2 # compare tokenizer processes

Writes a deterministic synthetic corpus once (``--work``, default /tmp/bench_data): .jsonl files of
about 10 M tokens each, documents of 50-1500 words drawn from a fixed 4096-word vocabulary (the
stdlib's most frequent words) with Zipf frequencies. A corpus of N M tokens is the first N/10 files. For each size and
num_proc it
runs, each in a fresh child process:

- prepare: `weightgeom.core.shards.prepare_corpus` with the embedded stdlib BPE (vocab 4096); wall time,
  tokens/s, peak RSS of the process (ru_maxrss) and of its tokenizer worker processes;
- reader: `load`-style read of the train split as `PackedBlocks(seq_len=128)` and 200 training
  batches of 16 blocks drawn as trainers/ce.py draws them (`batch_indices`, then
  `blocks[idx]`); peak RSS, the RSS after imports, ms per batch, and `batch_indices` cost
  (first call of an epoch draws the permutation; later calls reuse it).

Prints one JSON line per run and a Markdown table (with the 1-minute load average at the end of
each prepare: on a shared machine, read the CPU seconds). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's harness, not an installed copy
TOKENS_PER_FILE = 10_000_000


def _rss_kb(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _tokenizer(cache: str):
    from weightgeom.core.tokenizer import train_stdlib_tokenizer  # noqa: PLC0415

    return train_stdlib_tokenizer(4096, Path(cache).expanduser())


# ---------------------------------------------------------------------------------------------
# Synthetic corpus


def _vocabulary(size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The `size` most frequent words (letters only, >= 2) of the stdlib sources, Zipf probabilities
    by rank: text the stdlib BPE tokenizes at a realistic ~3-4 characters per token."""
    from collections import Counter  # noqa: PLC0415

    from weightgeom.core.tokenizer import stdlib_text_files  # noqa: PLC0415

    counts: Counter[str] = Counter()
    for path in stdlib_text_files():
        counts.update(re.findall(r"[A-Za-z]{2,}", path.read_text(encoding="utf-8", errors="replace")))
    words = np.array(sorted(counts, key=lambda w: (-counts[w], w))[:size], dtype=object)
    freq = 1.0 / np.arange(1, len(words) + 1)
    return words, freq / freq.sum()


def _documents(rng: np.random.Generator, words: np.ndarray, probs: np.ndarray, n_words: int):
    """Documents of 50-1500 words (a newline every 16 words) until `n_words` words are written."""
    done = 0
    while done < n_words:
        n = min(int(rng.integers(50, 1500)), n_words - done)
        picked = words[rng.choice(len(words), size=n, p=probs)]
        lines = [" ".join(picked[i:i + 16]) for i in range(0, n, 16)]
        yield "\n".join(lines) + "\n"
        done += n


def make_corpus(work: Path, n_files: int, cache: str) -> list[Path]:
    """`n_files` .jsonl files of ~10 M tokens each (reused when present; file i is seeded by i)."""
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    words, probs = _vocabulary()
    sample = "".join(_documents(np.random.default_rng(12345), words, probs, 200_000))
    tokens_per_word = len(_tokenizer(cache)(sample, add_special_tokens=False)["input_ids"]) / 200_000
    words_per_file = int(TOKENS_PER_FILE / tokens_per_word)
    files = []
    for i in range(n_files):
        path = corpus / f"part-{i:03d}.jsonl"
        if not path.is_file():
            t0 = time.perf_counter()
            tmp = path.with_suffix(".tmp")
            with tmp.open("w") as fh:
                for doc in _documents(np.random.default_rng(1000 + i), words, probs, words_per_file):
                    fh.write(json.dumps({"text": doc}) + "\n")
            tmp.rename(path)
            print(f"  wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s)",
                  flush=True)
        files.append(path)
    return files


# ---------------------------------------------------------------------------------------------
# Child processes


def child_prepare(args: argparse.Namespace) -> None:
    from weightgeom.core.shards import prepare_corpus, read_index  # noqa: PLC0415

    tokenizer = _tokenizer(args.tokenizer_cache)
    rss_start = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    prepare_corpus(args.files, tokenizer, args.out, num_proc=args.num_proc, progress=False)
    seconds = time.perf_counter() - t0
    index = read_index(args.out)
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "load_1min": os.getloadavg()[0],
                      "tokens": index["tokens"], "documents": index["documents"],
                      "rss_start_kb": rss_start,
                      "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "workers_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def child_read(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415

    from weightgeom.core.data import batch_indices  # noqa: PLC0415
    from weightgeom.core.shards import PackedBlocks, TokenShards  # noqa: PLC0415

    torch.set_num_threads(1)
    rss_imports = _rss_kb("VmRSS")
    blocks = PackedBlocks(TokenShards(args.dir, "train"), 128)
    t0 = time.perf_counter()
    batch_indices(len(blocks), 16, 0, seed=0)
    first_ms = (time.perf_counter() - t0) * 1e3
    t_idx = t_read = 0.0
    checksum = 0
    for step in range(1, 201):
        t0 = time.perf_counter()
        idx = batch_indices(len(blocks), 16, step, seed=0)
        t1 = time.perf_counter()
        batch = blocks[idx]
        t_read += time.perf_counter() - t1
        t_idx += t1 - t0
        checksum += int(batch[:, 0].sum())
    print(json.dumps({"blocks": len(blocks), "rss_imports_kb": rss_imports, "peak_kb": _rss_kb("VmHWM"),
                      "batch_ms": t_read / 200 * 1e3, "indices_first_ms": first_ms, "indices_ms": t_idx / 200 * 1e3,
                      "checksum": checksum}))


def _run_child(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"child {argv[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,100,200", help="corpus sizes in millions of tokens (multiples of 10)")
    parser.add_argument("--num-proc", default="1", help="comma-separated num_proc values to run for every size")
    parser.add_argument("--work", default="/tmp/bench_data", help="where the corpus and shards are written")
    parser.add_argument("--tokenizer-cache", default="~/.cache/weightgeom")
    parser.add_argument("--keep", action="store_true", help="keep the prepared shards")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(p) for p in args.num_proc.split(",")]
    work = Path(args.work)
    print(f"corpus: {work / 'corpus'} (~{TOKENS_PER_FILE // 1_000_000} M tokens per file)", flush=True)
    files = make_corpus(work, max(sizes) * 1_000_000 // TOKENS_PER_FILE, args.tokenizer_cache)
    rows = []
    for size in sizes:
        sources = [str(f) for f in files[: size * 1_000_000 // TOKENS_PER_FILE]]
        text_mb = sum(Path(f).stat().st_size for f in sources) / 1e6
        for num_proc in procs:
            out = work / f"shards-{size}M-np{num_proc}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            prep = _run_child(["_prepare", "--out", str(out), "--num-proc", str(num_proc), "--tokenizer-cache",
                               args.tokenizer_cache, *sources])
            read = _run_child(["_read", "--dir", str(out)])
            shard_mb = sum(p.stat().st_size for p in out.glob("*.bin")) / 1e6
            row = {"size_M": size, "num_proc": num_proc, "text_MB": text_mb, "shards_MB": shard_mb, **prep,
                   **{f"read_{k}": v for k, v in read.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                subprocess.run(["rm", "-rf", str(out)], check=True)
    print("\n| tokens | num_proc | text | prepare wall (CPU) | tokens/s | load | prepare peak RSS (workers) | "
          "reader peak RSS (after imports) | ms/batch (16x128) | batch_indices first / next |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        workers = f" ({r['workers_peak_kb'] / 1024:.0f} MiB)" if r["num_proc"] > 1 else ""
        print(f"| {r['tokens'] / 1e6:.1f} M | {r['num_proc']} | {r['text_MB']:.0f} MB | {r['seconds']:.1f} s "
              f"({r['cpu_seconds']:.0f} s) | {r['tokens'] / r['seconds'] / 1e6:.2f} M | {r['load_1min']:.1f} | "
              f"{r['peak_kb'] / 1024:.0f} MiB{workers} | "
              f"{r['read_peak_kb'] / 1024:.0f} MiB ({r['read_rss_imports_kb'] / 1024:.0f} MiB) | "
              f"{r['read_batch_ms']:.2f} | {r['read_indices_first_ms']:.0f} ms / {r['read_indices_ms']:.3f} ms |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_prepare", "_read"):
        child = argparse.ArgumentParser()
        child.add_argument("mode")
        child.add_argument("files", nargs="*")
        child.add_argument("--out")
        child.add_argument("--dir")
        child.add_argument("--num-proc", type=int, default=1)
        child.add_argument("--tokenizer-cache", default="~/.cache/weightgeom")
        parsed = child.parse_intermixed_args()
        child_prepare(parsed) if parsed.mode == "_prepare" else child_read(parsed)
    else:
        main()
