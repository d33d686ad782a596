"""The harness's choice lists, each written once as a `Literal` alias (the library's are in astra_peft/config.py).

Annotate a field with one of these and call `astra_peft.config.check_choices(self)` in `__post_init__`: that is
its validation. Derive CLI `choices=` and help from the matching tuple. This module imports nothing heavy, so
the command line can read it without torch.
"""

from __future__ import annotations

import typing
from typing import Literal

# What a task asks of the model: a label per text (sequence classification) or a completion (causal LM).
TaskKind = Literal["classification", "generation"]
# What a built-in model is: a decoder trained as a causal LM, or an encoder (BERT family).
ModelKind = Literal["causal-lm", "encoder"]
# What a data-driven method looks at before training: forward activations, or gradients too.
DataNeed = Literal["activations", "gradients"]

TASK_KINDS: tuple[str, ...] = typing.get_args(TaskKind)
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)
DATA_NEEDS: tuple[str, ...] = typing.get_args(DataNeed)

# The dtype a run loads its model in, and the split it evaluates during training.
ModelDtype = Literal["float32", "bfloat16"]
EvalSplit = Literal["dev", "test"]
MODEL_DTYPES: tuple[str, ...] = typing.get_args(ModelDtype)
EVAL_SPLITS: tuple[str, ...] = typing.get_args(EvalSplit)

# How an Astra run sizes its adapter: rank r in every layer (the paper), or ranks by each layer's effective rank
# under the same parameter budget (`astra_peft.allocate_ranks`).
RankAllocationKind = Literal["uniform", "effective_rank"]
RANK_ALLOCATION_KINDS: tuple[str, ...] = typing.get_args(RankAllocationKind)
