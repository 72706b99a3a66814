"""``compare_init``: the whole delta training wrote into a checkpoint, against random initialisations.

``harness compare init AFTER --seeds 0 1 2``: BASE is a random initialisation of AFTER's own config, built with
``AutoModelForCausalLM.from_config`` under a seeded RNG (weightgeom.core.models.random_init: the family's own
``_init_weights`` with the config's ``initializer_range``; tied embeddings stay tied), once per seed, so the
spread over seeds shows what the initialisation adds to each number. Each seed is one
:func:`weightgeom.harness.compare.analysis.compare_models` with the same options; only one initialisation is
alive at a time (memory: AFTER, one init and the deltas).

Defaults that differ from two checkpoints: ``C_a`` is measured by AFTER (an initialisation's activations carry
no learnt structure; ``c_a_model="base"`` forces the init's), with AFTER's tokenizer; it is measured once and
serves every seed, as does the mechanism metric (``mass``, measured on AFTER). The prediction subspace is
AFTER's unembedding (``unembed="after"``, the default); ``unembed="base"`` uses the init's, a random one.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from weightgeom.core.models import random_init
from weightgeom.harness.compare.analysis import (
    Checkpoint,
    Measurements,
    check_text,
    compare_models,
    load_model,
    pick_device,
    resolved,
)
from weightgeom.harness.compare.options import CompareOptions
from weightgeom.harness.compare.report import write_init_report
from weightgeom.harness.compare.result import InitResult


def compare_init(after_dir: str | Path, options: CompareOptions | None = None, *,
                 device: str | torch.device | None = None, out_dir: str | Path | None = None,
                 progress: bool = False, **overrides) -> InitResult:
    """AFTER against a random initialisation of its config for every seed of ``options.seeds``.

    Args:
        after_dir: a local model directory, a ``.gguf`` file or a short name (smollm2-135m-instruct).
        options: :class:`CompareOptions` (``seeds``, ``k``, ``mass``, ``read_side``, ...); keyword ``overrides``
            replace its fields.
        device: where models and geometry run (each init is built on the CPU, then moved).
        out_dir: when given, ``report.md`` (mean and spread over seeds), ``init.json`` and one compare report per
            seed in ``seed_{s}/``.
        progress: print one line per seed.
    """
    options = (options or CompareOptions()).replace(**overrides)
    device = pick_device(device)
    check_text(options)
    after_dir = resolved("AFTER", after_dir)
    after = Checkpoint("AFTER", load_model("AFTER", after_dir, device), after_dir)
    config = after.model.config
    measurements = Measurements(device)
    results = []
    for seed in options.seeds:
        if progress:
            print(f"[compare init] seed {seed}: {config.model_type} initialised from its config", flush=True)
        base = Checkpoint("BASE", random_init(config, seed).to(device), None, name=f"init (seed {seed})")
        result = compare_models(base, after, options, measurements)
        result.notes.insert(0, f"BASE is a random initialisation of AFTER's config (seed {seed}; the family's own "
                               f"_init_weights, initializer_range {getattr(config, 'initializer_range', None)}).")
        results.append(result)
        del base
        gc.collect()
    init = InitResult(str(after_dir), config.model_type, getattr(config, "initializer_range", None),
                      options.seeds, results)
    if len(options.seeds) == 1:
        init.notes.append("One seed: no spread over initialisations (--seeds 0 1 2 shows it).")
    if out_dir is not None:
        write_init_report(init, out_dir)
    return init
