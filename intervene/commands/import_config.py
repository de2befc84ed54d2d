"""``intervene import-config REF.yml -o NATIVE.yaml``: what a reference-schema config means, as a native one."""

from __future__ import annotations

import argparse

from ..config.reference import import_config
from .common import add_reference_options, add_verb

SUMMARY = "convert a reference-tool (llm-abliteration sharded_ablate.py) YAML into the native config it means"
DESCRIPTION = """Reads a config in the reference tool's schema (model, measurements, output, ablate entries of
layer/measurement/scale/sparsity, and the MoE keys ablate_individual_experts / expert_subset), and writes the
native config that bake, try and verify run for it: explicit targets (o_proj, shared experts, router at 0.5x on
MoE layers; o_proj, mlp.down_proj on dense ones; each expert's down/gate/up with individual experts), scales,
hidden-state numbers turned into decoder-layer indices, the reference's sparsity as 'keep'. It prints what each
entry became and what the native config cannot express. The model's config.json is read to tell MoE layers
from dense ones."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "import-config", run, summary=SUMMARY, description=DESCRIPTION)
    p.add_argument("config", help="reference-schema YAML (sharded_ablate.py's)")
    p.add_argument("-o", "--output", default=None, help="native config to write (default: print the mapping only)")
    p.add_argument("--model", default=None, help="model whose architecture decides the targets (default: the config's)")
    add_reference_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    translation = import_config(args.config, args.output, model=args.model,
                                ablate_individual_experts=args.ablate_individual_experts,
                                expert_subset=args.expert_subset)
    print(translation.describe())
    if args.output:
        print(f"native config -> {args.output}")
        print(f"next: intervene bake {args.output}")
    else:
        print(translation.config.to_yaml(), end="")
    return 0
