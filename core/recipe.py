"""THE recipe schema. One YAML file describes one run; the launcher and every rank read it
through these models. `extra="forbid"` everywhere: a misspelt key is an error, never ignored.

    recipe = load_recipe("recipes/demo.yaml", overrides=["train.lr=1e-4"])
    recipe.run_dir  ->  Path(output_dir) / name

Nothing here imports torch: the launcher imports this module on login nodes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
import json
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import Field, field_validator, model_validator

from .errors import RecipeError

from .recipe_parts import (METHODS, AdapterConfig, CheckpointConfig, ClusterConfig, IA3Config,  # noqa: F401,E402
                           LoraConfig, MethodConfig, PromptConfig, QuantConfig, _Section)


# ----------------------------------------------------------------------------- model
class ModelConfig(_Section):
    path: str = Field(description="Hugging Face hub id or local folder of the base model.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer hub id or folder; default: model.path.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Training precision. bf16 on Ampere/Hopper GPUs; fp32 is exact on CPU.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel passed to transformers. auto: the fastest the model family "
                            "supports (core/families.py): flash_attention_2 with flash_attn on CUDA, else sdpa; "
                            "eager where it must be (Gemma 2's soft-capping); chosen before torchrun and "
                            "recorded in RUN_DIR/recipe.yaml. An explicit kernel the family lacks is an error.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="Fused kernels (training/model/kernels.py): liger = liger-kernel's RMSNorm, SwiGLU, RoPE "
                            "and, at ZeRO 0-2, its fused linear cross entropy (pip install 'zerotune[gpu]'); none = "
                            "transformers' own. auto: liger when liger_kernel is installed, the run is on a CUDA GPU "
                            "and the model family is one of core.memory.LIGER_FAMILIES, else none (decided by the "
                            "launcher for local GPUs, on each rank for Slurm jobs; RUN_DIR/recipe.yaml records it).")
    chat_template: Optional[str] = Field(
        None, description="None: the tokenizer's own template; a built-in name (chatml, llama3, alpaca, "
                          "plain), a path to a .jinja file (relative: to the working directory) or a Jinja "
                          "template string.")


# ----------------------------------------------------------------------------- data
FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")


class DataSource(_Section):
    path: str = Field(description="A .json/.jsonl/.parquet/.csv file, a folder of them, a load_from_disk folder or a hub id.")
    format: Literal[FORMATS] = Field(description="alpaca | sharegpt | messages | prompt_completion | text")
    weight: float = Field(1.0, gt=0, description="Sampling ratio relative to the other sources.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename map: {format field: column in the file}.")
    split: str = Field("train", description="Split name for hub datasets.")
    name: Optional[str] = Field(None, description="Hub dataset config name.")


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1, description="Training sources.")
    eval: list[DataSource] = Field(default_factory=list, description="Validation sources (else eval_split of train).")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of train held out for eval when eval is empty.")
    max_len: int = Field(2048, gt=8, description="Maximum tokens per sample (and per packed sequence).")
    packing: bool = Field(False, description="Pack several samples per sequence (no cross-attention). Off "
                                             "unless set: a packed row holds several samples, so steps per epoch "
                                             "and samples per step change (the plan line says the padding it saves).")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens.")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Assistant turns that train: all, or only the last (history masked); "
                                     "a turn's loss_weight / train flag overrides.")
    train_on_reasoning: bool = Field(True, description="Train on assistant reasoning (reasoning_content / "
                                                       "thinking, rendered <think>...</think>); false masks it "
                                                       "and trains the answer only.")
    truncation: Literal["truncate", "drop"] = Field("truncate", description="Over-long samples: truncate or drop.")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="Malformed rows: stop with an error, or skip and count.")
    system_prompt: Optional[str] = Field(None, description="Default system prompt for sources without one.")
    cache_dir: Optional[str] = Field(None, description="Tokenized cache; default RUN_DIR/../.zerotune-cache.")


# ----------------------------------------------------------------------------- train
class EarlyStopping(_Section):
    patience: int = Field(3, gt=0, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Improvement smaller than this does not count.")


@dataclass(frozen=True)
class BatchGeometry:
    """Samples per optimizer step = micro_batch_size x grad_accum x world_size."""
    micro_batch_size: int   # samples per GPU per forward
    grad_accum: int         # micro-batches per optimizer step on each rank
    world_size: int         # data-parallel ranks

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


LONG_TOKENS = 16384   # train.tiled_mlp auto: on from this many tokens of a sequence per GPU


class TrainConfig(_Section):
    epochs: Optional[float] = Field(1.0, gt=0, description="Passes over the data (ignored if max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_size: Union[int, Literal["auto"]] = Field(
        1, description="Samples per GPU per forward. auto (needs global_batch_size): the largest the planner finds "
                       "fits the GPU, gradient accumulation keeping global_batch_size; RUN_DIR/recipe.yaml records it.")
    grad_accum: Optional[int] = Field(None, gt=0, description="Micro-batches per optimizer step (or set global_batch_size).")
    global_batch_size: Optional[int] = Field(None, gt=0, description="Samples per optimizer step over all GPUs.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup steps (or warmup_ratio).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of lr.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (DeepSpeed fused/CPU Adam) or bitsandbytes 8-bit / paged variants.")
    betas: tuple[float, float] = Field((0.9, 0.999))
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 disables).")
    seed: int = Field(42, description="Seed for init, data order and dropout.")
    gradient_checkpointing: Union[bool, int, Literal["auto"]] = Field(
        "auto", description="Recompute activations in backward: true all decoder layers, false none, N the first N. "
                          "auto: the fewest the planner finds fit (recorded in RUN_DIR/recipe.yaml).")
    fused_loss: Union[bool, Literal["auto"]] = Field(
        "auto", description="Cross entropy through the LM head in chunks, never holding the full logits (model/loss.py). "
                            "auto: the plain loss when its logits fit the GPU, else the chunked one.")
    tiled_mlp: Union[bool, Literal["auto"]] = Field(
        "auto", description="Each layer's MLP over the sequence in tiles of hidden_size tokens (model/long_sequence.py): "
                            "its intermediates exist one tile at a time. auto: only when nothing fits without it.")
    offload_activations: Union[bool, int, Literal["auto"]] = Field(
        "auto", description="Checkpointed layer inputs in pinned CPU memory until their backward: true all, N the "
                            "first N. auto: the fewest the planner finds fit the GPU (GPU and host memory).")
    recompute_attention: Union[bool, Literal["auto"]] = Field(
        "auto", description="A checkpointed layer runs attention again in the backward (true), or keeps its output (false: "
                            "hidden_size x 2 bytes a token a layer more, the attention forward once less). auto: kept "
                            "where the planner finds it faster and it fits (LoRA with liger's kernels or compile off, "
                            "long sequences: launcher/plan.py kept_attention_lever), else recomputed.")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="torch.compile each decoder layer (full/lora at ZeRO 0-2; the first step compiles ~1 min). "
                            "auto: on for those on CUDA GPUs without liger's kernels (launcher/prepare.py).")
    precision: Literal["bf16", "fp8", "auto"] = Field(
        "auto", description="Decoder linears' matmuls: bf16 or fp8 (torchao float8; full: every decoder linear, lora: the "
                            "frozen base's). auto: fp8 only where core/precision.py measured it faster (recorded).")
    eval_every: Optional[int] = Field(None, gt=0, description="Evaluate every N steps (and at the end).")
    eval_batches: Optional[int] = Field(None, gt=0, description="Cap on eval micro-batches per evaluation.")
    eval_prompts: list[str] = Field(
        default_factory=list, description="Prompts the model answers (greedy, with the chat template when the data "
                                          "is chat-formatted) at each evaluation; logged as text to every tracker.")
    eval_max_new_tokens: int = Field(32, gt=0, description="Tokens generated per eval prompt.")
    early_stopping: Optional[EarlyStopping] = Field(None, description="Stop when eval loss stops improving.")
    max_bad_steps: int = Field(5, gt=0, description="Consecutive non-finite losses before the run stops.")

    @model_validator(mode="after")
    def _steps(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.epochs or train.max_steps")
        if self.micro_batch_size != "auto" and self.micro_batch_size < 1:
            raise ValueError("micro_batch_size: must be 1 or more (or auto)")
        if self.micro_batch_size == "auto" and self.global_batch_size is None:
            raise ValueError("micro_batch_size: auto needs train.global_batch_size (the batch it keeps; "
                             "gradient accumulation makes up the rest)")
        if self.grad_accum is not None and self.global_batch_size is not None:
            raise ValueError("set train.grad_accum or train.global_batch_size, not both")
        if any(not p.strip() for p in self.eval_prompts):
            raise ValueError("eval_prompts: a prompt is empty")
        g, o = self.gradient_checkpointing, self.offload_activations   # true / false / auto / N layers
        if any(type(v) is int and v < 0 for v in (g, o)) or (type(o) is int and type(g) is int and o > g):
            raise ValueError(f"gradient_checkpointing {g}, offload_activations {o}: layer counts are 0 or more, "
                             "no more layers offloaded than checkpointed")
        if o not in (False, 0, "auto") and g in (False, 0):
            raise ValueError(f"offload_activations: {str(o).lower()} offloads the inputs gradient checkpointing "
                             "keeps: set train.gradient_checkpointing: true (or auto)")
        return self

    def geometry(self, world_size: int) -> "BatchGeometry":
        """The batch geometry of a step on `world_size` ranks: the one place it is computed."""
        return BatchGeometry(self.micro_batch_size, self.accumulation(world_size), world_size)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.micro_batch_size == "auto":
            raise RecipeError("train.micro_batch_size: auto is resolved by the launcher (zerotune train / launch)")
        if self.global_batch_size is None:
            return self.grad_accum or 1
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise RecipeError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x GPUs ({world_size})")
        return self.global_batch_size // per_step


# ----------------------------------------------------------------------------- distributed, checkpoint, logging, cluster
class DistributedConfig(_Section):
    zero: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto", description="ZeRO stage 0-3, or auto (the planner picks the fastest that fits).")
    offload_optimizer: bool = Field(False, description="Optimizer states and step on CPU (ZeRO 1-3).")
    offload_params: bool = Field(False, description="Parameters on CPU between uses (ZeRO-3 only).")
    timeout_minutes: int = Field(30, gt=0, description="Collective timeout.")
    sequence_parallel: int = Field(
        1, ge=1, le=64, description="GPUs that share one sequence (DeepSpeed Ulysses, for long context): must divide "
                                    "the GPUs of a node; data parallelism runs over GPUs / N (docs/long_context.md).")

    def replicas(self, world_size: int) -> int:
        """Data-parallel replicas on `world_size` ranks: each group of `sequence_parallel` ranks
        shares one sequence, so the batch geometry and the sampler see world / N ranks."""
        if world_size % self.sequence_parallel:
            raise RecipeError(f"distributed.sequence_parallel: {self.sequence_parallel} must divide the number of "
                              f"processes ({world_size})")
        return world_size // self.sequence_parallel

    @model_validator(mode="after")
    def _offload(self):
        if self.offload_params and self.zero not in (3, "auto"):
            raise ValueError(f"distributed.offload_params needs zero: 3 (got zero: {self.zero})")
        if self.offload_optimizer and self.zero == 0:
            raise ValueError("distributed.offload_optimizer needs zero 1, 2 or 3 (got zero: 0)")
        return self


# Keys a resumed run may change without checkpoint.allow_recipe_change: they decide how long the
# run goes (the LR schedule then ends at the new last step), when it evaluates, saves and logs,
# and where it runs; not the model, the method, the data, the batch or the optimizer.
# How the same maths is computed (recompute, offload, kernels, compile) follows the GPU a resumed run gets.
RESUME_SAFE_KEYS = ("output_dir", "train.max_steps", "train.epochs", "train.eval_every", "train.eval_batches",
                    "train.eval_prompts", "train.eval_max_new_tokens", "train.early_stopping", "train.max_bad_steps",
                    "checkpoint", "logging", "cluster", "distributed.timeout_minutes", "distributed.sequence_parallel",
                    "data.cache_dir", "train.gradient_checkpointing", "train.offload_activations", "train.tiled_mlp",
                    "train.compile", "train.recompute_attention", "model.attn_implementation", "model.kernels")


TRACKERS = ("tensorboard", "wandb", "mlflow")


class LoggingConfig(_Section):
    report_to: list[Literal[TRACKERS]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trackers rank 0 reports to: tensorboard (RUN_DIR/tensorboard), wandb (RUN_DIR/wandb; "
                    "pip install 'zerotune[wandb]'; WANDB_MODE=offline works without a login), mlflow "
                    "(MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns; pip install 'zerotune[mlflow]').")
    tensorboard: bool = Field(True, description="Older switch, kept in step with report_to: false drops tensorboard.")
    project: Optional[str] = Field(None, description="wandb project and MLflow experiment; default WANDB_PROJECT / "
                                                     "MLFLOW_EXPERIMENT_NAME, else zerotune.")
    every: int = Field(1, gt=0, description="Log train scalars every N steps.")
    verbose: bool = Field(False, description="Show other packages' warnings and banners on the console too "
                                             "(default: only in RUN_DIR/logs; core/quiet.py). ZEROTUNE_VERBOSE=1 "
                                             "does the same for every command.")
    profile_start: Optional[int] = Field(None, gt=0, description="Profile optimizer steps from this one "
                                         "(torch.profiler): RUN_DIR/profile/ gets rank 0's trace and a summary of "
                                         "where the time went (attention, matmul, loss, optimizer, communication).")
    profile_steps: int = Field(3, gt=0, description="Steps in the profile window.")
    progress: bool = Field(True, description="Progress bar on rank 0.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _trackers(self):
        explicit = self.model_fields_set
        both = "tensorboard" in explicit and "report_to" in explicit
        if both and self.tensorboard != ("tensorboard" in self.report_to):
            raise ValueError(f"tensorboard: {str(self.tensorboard).lower()} contradicts report_to: {self.report_to}; "
                             "drop logging.tensorboard (report_to lists the trackers)")
        report = [t for t in dict.fromkeys(self.report_to) if t != "tensorboard" or self.tensorboard
                  or "report_to" in explicit]
        self.__dict__.update(report_to=report, tensorboard="tensorboard" in report)  # no re-validation
        return self


# ----------------------------------------------------------------------------- recipe
class Recipe(_Section):
    name: str = Field(description="Run name; RUN_DIR is output_dir/name.")
    output_dir: str = Field("runs", description="Folder that holds runs.")
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", v):
            raise ValueError(f"{v!r} must start with a letter or digit and hold only letters, digits, '.', '_' and '-'")
        return v

    @model_validator(mode="after")
    def _method_defaults(self):
        """Defaults and limits that depend on the method (checked here, before any GPU time)."""
        kind = self.method.kind
        if kind == "qlora" and "optimizer" not in self.train.model_fields_set:
            self.train.optimizer = "paged_adamw_8bit"  # the QLoRA paper's choice
        if kind == "prefix_tuning":
            if "gradient_checkpointing" not in self.train.model_fields_set or self.train.gradient_checkpointing == "auto":
                self.train.gradient_checkpointing = False
            elif self.train.gradient_checkpointing:
                raise ValueError("method.kind prefix_tuning needs train.gradient_checkpointing: false "
                                 "(peft's prefix tuning does not support it)")
        if self.distributed.zero == 3 and kind not in ("full", "lora", "qlora"):
            raise ValueError(f"method.kind {kind} runs at ZeRO 0-2 (distributed.zero: 3 is for full, lora and qlora)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def zero_stage(self) -> int:
        """The ZeRO stage to run; `auto` is resolved by the launcher before RUN_DIR is written."""
        z = self.distributed.zero
        if z == "auto":
            return 3 if not self.method.is_peft else 0
        return z

    def tokens_per_gpu(self) -> int:
        """The most tokens of one sequence a GPU holds: max_len over the sequence-parallel degree."""
        return -(-self.data.max_len // self.distributed.sequence_parallel)

    def uses_tiled_mlp(self) -> bool:
        """train.tiled_mlp (the launcher resolves auto; unresolved: on from LONG_TOKENS per GPU)."""
        if self.train.tiled_mlp == "auto":
            return self.tokens_per_gpu() >= LONG_TOKENS
        return bool(self.train.tiled_mlp)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """Hash of the resolved recipe (stored in checkpoints)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
