"""Astra inside transformers' `Trainer` and TRL's `SFTTrainer`: one call between building the trainer and training.

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=LoraConfig(...))
    initialize_astra_for_trainer(trainer, AstraConfig(), num_batches=16)      # resume: resume_from_checkpoint=…
    trainer.train()                                                           # the same value as here
    trainer.save_model("out")   # out/ is a plain LoRA of the ORIGINAL base; out/astra/ holds the residual form

The call calibrates on the trainer's own training batches (its collator, its padding), initialises, saves the
initial adapter once to `<output_dir>/astra_init/`, and installs `AstraTrainerCallback`, which adds the plain-LoRA
conversion to every checkpoint and `save_model()` folder (see `folders.py` for the layout) and stops a resumed
`train()` whose residual base is not the checkpoint's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from .._adapter_checks import mark_residual
from ..config import AstraConfig
from ..conversion import adapter_files, copy_adapter
from ..initialization import AstraReport, initialize_astra_weights
from ..layers import lora_layers
from .folders import (
    EXTRA_DIR, FORMAT, INIT_DIR, MANIFEST, base_fingerprint, check_ours, init_sha256, lora_settings,
    read_manifest, our_dir, restore_astra_initialization, tensors_sha256, write_extras, write_json,
)

_LABEL_KEYS = ("labels", "label", "label_ids")


class AstraTrainerCallback(TrainerCallback):
    """Keeps a Trainer run with Astra correct on disk and on resume. Installed by `initialize_astra_for_trainer`.

    * `on_save`: every checkpoint gets `astra/lora` (the trained model as a plain LoRA of the original base),
      `astra/initial` and `astra/astra.json`; its own adapter stays the residual form Trainer resumes from,
      marked `init_lora_weights: "astra"` so PEFT refuses to load it onto the original base.
    * `on_train_begin`: a `train()` that resumed a checkpoint must run on that checkpoint's residual base;
      otherwise it raises before the first step.

    Args:
        output_dir: The Trainer's `output_dir`; the initial adapter is kept in its `astra_init` folder.
        manifest: What the initialisation recorded (method, config, report), written as `astra/astra.json`.
        restored_step: The checkpoint step the initialisation was restored from, or None for a fresh one.
    """

    def __init__(self, output_dir, manifest: dict, restored_step: Optional[int] = None):
        self.initial_dir = Path(output_dir) / INIT_DIR
        self.manifest = manifest
        self.restored_step = restored_step

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        if self.restored_step is not None:
            if self.restored_step != state.global_step:
                raise RuntimeError(
                    f"initialize_astra_for_trainer restored the Astra initialisation of a checkpoint at step "
                    f"{self.restored_step}, but train() resumed one at step {state.global_step}: pass the same "
                    "resume_from_checkpoint to both."
                )
            return
        saved = read_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}" / EXTRA_DIR)
        if saved is not None and saved.get("init_sha256") == self.manifest["init_sha256"]:
            return  # calibrating again reproduced the checkpoint's initialisation bit for bit
        raise RuntimeError(
            f"train() resumed a checkpoint (step {state.global_step}), but Astra was initialised afresh for this "
            "trainer: the adapter loaded from the checkpoint was trained on another residual base, and training on "
            "would give a wrong model. Build the trainer again and call initialize_astra_for_trainer(trainer, "
            "resume_from_checkpoint=<the checkpoint>) before trainer.train(resume_from_checkpoint=<the checkpoint>)."
        )

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            raise FileNotFoundError(
                f"AstraTrainerCallback: the checkpoint folder {checkpoint} was not found, so its plain-LoRA "
                "conversion cannot be written (hyperparameter search runs are not supported)."
            )
        write_extras(checkpoint, self.initial_dir, {**self.manifest, "global_step": state.global_step},
                     saved_model=False)

    def finish_saved_model(self, folder, global_step: int) -> None:
        """After `trainer.save_model(folder)`: the plain LoRA on top, the residual form under `astra/`."""
        write_extras(folder, self.initial_dir, {**self.manifest, "global_step": global_step}, saved_model=True)


def initialize_astra_for_trainer(
    trainer,
    astra_config: Optional[AstraConfig] = None,
    *,
    num_batches: int = 16,
    resume_from_checkpoint: Union[str, bool, None] = None,
    forward_fn=None,
) -> Optional[AstraReport]:
    """Initialise the trainer's PeftModel with Astra, or restore a checkpoint's initialisation, before `train()`.

    Fresh start: calibrates on the first `num_batches` batches of `trainer.get_train_dataloader()` (the
    trainer's collator and padding; padding is masked out; labels are not fed), initialises, and saves the
    initial adapter to `<output_dir>/astra_init/`. Resume: rebuilds the residual base exactly from the
    checkpoint's `astra/initial` (no calibration), so the adapter `train(resume_from_checkpoint=...)` loads sits
    on the base it was trained on. Either way the adapter config is marked `init_lora_weights: "astra"` and an
    `AstraTrainerCallback` is added; `trainer.save_model()` then writes a plain LoRA of the original base.
    Torch's random state is the same after the call as before it (calibration does not shift the data order).

    Args:
        trainer: A `transformers.Trainer` (or TRL `SFTTrainer`, or any subclass) whose `model` is a PeftModel
            with one LoRA adapter, built and not yet trained.
        astra_config: The Astra settings; `AstraConfig()` when None.
        num_batches: Training batches to calibrate on (fewer if one epoch has fewer). Ignored on resume.
        resume_from_checkpoint: The value you will pass to `trainer.train(resume_from_checkpoint=...)`: a
            checkpoint folder, or True for the last one in `output_dir`.
        forward_fn: `forward_fn(model, batch)` for models that `model(**batch)` does not fit.

    Returns:
        The `AstraReport` of a fresh initialisation; None when restored for a resume.

    Raises:
        ValueError: The trainer's model is not a single-adapter PeftModel, the trainer uses DeepSpeed ZeRO-3 or FSDP
            (not supported yet), the trainer scores a reference with the adapters disabled (TRL's DPO, KTO, GRPO,
            RLOO without a ref_model), `num_batches` < 1, the batches hold too few tokens (the message says how to get
            more), or the checkpoint does not fit the model.
        RuntimeError: The trainer has started (an optimizer exists or `global_step` > 0), or the model was
            already initialised by Astra.
        FileNotFoundError: The checkpoint has no `astra/` folder (it was not written with this callback).
    """
    model, adapter_name = _single_adapter_model(trainer)
    _refuse_started(trainer)
    _refuse_sharded(trainer, model)
    _refuse_reference_from_disabled_adapters(trainer)
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}.")
    output_dir = Path(trainer.args.output_dir)
    if trainer.args.should_save:
        check_ours(output_dir / INIT_DIR)  # before anything is computed or written
    fingerprint = base_fingerprint(model, adapter_name)  # of the ORIGINAL base, before anything is written
    settings = lora_settings(model.peft_config[adapter_name])
    report, restored_step = None, None
    if resume_from_checkpoint:
        checkpoint = _resolve_checkpoint(resume_from_checkpoint, output_dir)
        saved = read_manifest(checkpoint / EXTRA_DIR)
        if saved is None:
            raise FileNotFoundError(
                f"{checkpoint} has no {EXTRA_DIR}/{MANIFEST}: it was not saved by a trainer set up with "
                "initialize_astra_for_trainer, so its Astra initialisation cannot be restored from it. If you "
                "kept the adapter saved right after initialisation, restore it with "
                "astra_peft.integrations.restore_astra_initialization(trainer.model, <that folder>)."
            )
        if saved["base_fingerprint"] != fingerprint:
            raise ValueError(
                f"{checkpoint} was trained on another base model (weight fingerprint {saved['base_fingerprint']} "
                f"vs {fingerprint} here): build the trainer on the model that run started from."
            )
        source = checkpoint / EXTRA_DIR / "initial"
        if tensors_sha256(load_file(str(adapter_files(source)[1]))) != saved["init_sha256"]:
            raise ValueError(f"{source} does not hold the initialisation its manifest names (edited or damaged "
                             "files); the model was left unchanged.")
        restore_astra_initialization(model, source, adapter_name)
        restored_step = saved["global_step"]
        manifest = {k: saved[k] for k in ("adapter_name", "base_fingerprint", "init_sha256", "lora_settings",
                                          "astra_config")}
    else:
        config = astra_config or AstraConfig()
        with _same_random_state():
            report = _initialize(trainer, model, config, num_batches, forward_fn, adapter_name)
        manifest = {"adapter_name": adapter_name, "base_fingerprint": fingerprint,
                    "init_sha256": init_sha256(model, adapter_name), "lora_settings": settings,
                    "astra_config": config.to_dict()}
        source = None
    mark_residual(model.peft_config[adapter_name])  # every save of this adapter says so (also on resume)
    if trainer.args.should_save:
        _save_initial(model, adapter_name, output_dir, manifest, source)
    callback = AstraTrainerCallback(output_dir, manifest, restored_step)
    trainer.add_callback(callback)
    _wrap_save_model(trainer, callback)
    return report


def _initialize(trainer, model, config, num_batches, forward_fn, adapter_name) -> AstraReport:
    batches = _model_batches(trainer, model, num_batches)
    try:
        return initialize_astra_weights(model, batches, config, forward_fn=forward_fn, adapter_name=adapter_name)
    except ValueError as err:
        if "calibration tokens" not in str(err):
            raise
        raise ValueError(
            f"{err} Here the calibration read {num_batches} batch(es) of "
            f"{trainer.args.per_device_train_batch_size} training rows: raise num_batches (or the batch size, or "
            "use longer rows). The model was left unchanged."
        ) from err


def _model_batches(trainer, model, num_batches: int):
    """The first `num_batches` training batches as plain dicts of what the model's forward takes (no labels)."""
    forward = model.get_base_model().forward
    params = inspect.signature(forward).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    drop = set(_LABEL_KEYS) | set(getattr(trainer, "label_names", None) or ())
    keep = named - drop

    def batches():
        for batch in itertools.islice(trainer.get_train_dataloader(), num_batches):
            inputs = {k: v for k, v in batch.items() if (k in keep if keep else k not in drop)}
            if "use_cache" in named:
                inputs["use_cache"] = False  # no KV cache is needed to read activations
            yield inputs

    return batches()


@contextlib.contextmanager
def _same_random_state():
    # The train sampler draws its permutation from torch's global generator: calibrating must not move it.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _save_initial(model, adapter_name, output_dir: Path, manifest: dict, source: Optional[Path]) -> None:
    """`<output_dir>/astra_init/`: the initial adapter (marked) and the manifest, replacing an earlier one of ours."""
    output_dir.mkdir(parents=True, exist_ok=True)
    dest = output_dir / INIT_DIR
    existing = read_manifest(dest) if dest.exists() else None
    if existing is not None and existing.get("init_sha256") == manifest["init_sha256"]:
        return
    with our_dir(dest) as stage:
        if source is not None:
            copy_adapter(source, stage)
        else:
            model.save_pretrained(str(stage), selected_adapters=[adapter_name])
        write_json(stage / MANIFEST, {**manifest, "format": FORMAT, "kind": "initial"})


def _wrap_save_model(trainer, callback: AstraTrainerCallback) -> None:
    """`trainer.save_model` runs unchanged, then (outside checkpoints, which `on_save` handles) adds `astra/`.

    Trainer fires no callback event for `save_model()`, so this is the one place to hook it.
    """
    original = trainer.save_model
    while getattr(original, "_astra_original", None) is not None:
        original = original._astra_original

    @functools.wraps(original)
    def save_model(output_dir: Optional[str] = None, _internal_call: bool = False):
        folder = Path(output_dir if output_dir is not None else trainer.args.output_dir)
        if folder.resolve() == callback.initial_dir.resolve():
            raise ValueError(f"save_model({str(folder)!r}) would overwrite the initial adapter the conversions need: "
                             "choose another folder.")
        original(output_dir, _internal_call=_internal_call)
        in_checkpoint = _internal_call and folder.name == f"checkpoint-{trainer.state.global_step}"
        if trainer.args.should_save and not in_checkpoint:
            callback.finish_saved_model(folder, trainer.state.global_step)

    save_model._astra_original = original
    trainer.save_model = save_model


def _single_adapter_model(trainer):
    from peft import PeftModel

    model = trainer.model
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"trainer.model is a {type(model).__name__}, not a PeftModel: build the trainer with a PeftModel "
            "(get_peft_model(model, LoraConfig(...))) or, with TRL, SFTTrainer(..., peft_config=LoraConfig(...))."
        )
    names = list(model.peft_config)
    if len(names) != 1 or not lora_layers(model, names[0]):
        raise ValueError(f"initialize_astra_for_trainer supports a PeftModel with one LoRA adapter; found {names}.")
    return model, names[0]


def _refuse_started(trainer) -> None:
    if trainer.state.global_step > 0 or trainer.optimizer is not None:
        raise RuntimeError(
            "The trainer has already started (global_step "
            f"{trainer.state.global_step}, optimizer {'created' if trainer.optimizer is not None else 'none'}): "
            "Astra must be initialised after the trainer is built and before trainer.train(), never from a "
            "callback (on a resumed run that would overwrite the checkpoint's adapter). To resume, build a new "
            "trainer and call initialize_astra_for_trainer(trainer, resume_from_checkpoint=...) before "
            "trainer.train(resume_from_checkpoint=...)."
        )


def _refuse_sharded(trainer, model) -> None:
    # Saving the initial adapter and hashing it read whole tensors, and the checkpoints' conversion reads what
    # Trainer saved; neither is tested with ZeRO-3 partitions or FSDP, so they are refused rather than risked.
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if partitioned or getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "initialize_astra_for_trainer does not support "
            f"{'DeepSpeed ZeRO-3' if partitioned else 'FSDP'} trainers yet: initialise with "
            "astra_peft.initialize_astra_weights before building the trainer (see the README's DeepSpeed and FSDP "
            "routes), save the adapter right after, and convert at the end with astra_peft.save_as_lora."
        )


def _refuse_reference_from_disabled_adapters(trainer) -> None:
    # TRL's preference and RL trainers (DPO, KTO, GRPO, RLOO), given a PeftModel and no ref_model, score the
    # reference with the adapters disabled (`ref_model` is None; GRPO/RLOO with beta 0 use no reference). After
    # Astra that is the residual W − s·B·A, not the model being fine-tuned: the log-ratios and KL terms would be
    # off with no error (tests/test_trl_reference.py shows it). Initialised before the trainer is built,
    # the PeftModel is given a "ref" adapter copied from the initial one by TRL, and residual + ref is the original.
    if getattr(trainer, "ref_model", False) is None and getattr(trainer, "beta", 1.0) != 0.0:
        raise ValueError(
            f"{type(trainer).__name__} scores its reference with this model's adapters disabled (ref_model=None), "
            "which after Astra's rewrite is the residual base W − s·B·A, not the model you fine-tune from: the "
            "reference log-probabilities would be silently wrong. Initialise Astra before building the trainer "
            "(astra_peft.initialize_astra_weights on the PeftModel) and pass that PeftModel as `model`: TRL then "
            "keeps a copy of the initial adapter as its 'ref' adapter, and the residual base with it is the "
            "original model. Save the trained adapter with astra_peft.save_as_lora. Or pass an explicit ref_model."
        )


def _resolve_checkpoint(resume_from_checkpoint, output_dir: Path) -> Path:
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir}).")
        return Path(last)
    checkpoint = Path(resume_from_checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {checkpoint} does not exist.")
    return checkpoint
