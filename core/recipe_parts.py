"""Recipe sections that stand on their own: checkpoints, the method (which parameters train and
how) and the cluster (Slurm settings). core/recipe.py assembles them into the Recipe."""
from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- checkpoint
class CheckpointConfig(_Section):
    every: Optional[int] = Field(None, gt=0, description="Save every N optimizer steps (and always at the end).")
    keep: int = Field(2, gt=0, description="Complete checkpoints kept (plus the best by eval loss).")
    resume: str = Field("auto", description="auto (newest complete), never, or a checkpoint path.")
    overwrite: bool = Field(False, description="With resume: never, allow a run dir that holds checkpoints "
                                               "(they are replaced as new ones are saved).")
    save_final: bool = Field(True, description="Write RUN_DIR/final in Hugging Face format at the end.")
    async_save: bool = Field(True, description="Write checkpoints from a background thread: training waits only "
                                               "while each rank copies its part to CPU memory (training/checkpoint/async_save.py).")
    allow_recipe_change: bool = Field(
        False, description="Resume a run whose checkpoints were trained with a recipe that differs in keys that "
                           "change the training (model, method, data, batch, optimizer, ...); the earlier recipe is "
                           "kept as RUN_DIR/recipe.<step>.yaml. Not needed for the run's length (train.max_steps, "
                           "train.epochs), eval, checkpoint.*, logging.*, cluster.* and the other RESUME_SAFE_KEYS.")


# ----------------------------------------------------------------------------- method
class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input (above 0 each adapted linear "
                                                         "keeps its own dropped-out copy of its input for the backward).")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' or a list of module names (q_proj, v_proj, ...). A mixture of "
                                  "experts (Mixtral, Qwen-MoE, OLMoE): all-linear adapts the linear layers outside "
                                  "the MoE blocks (attention, dense MLP layers); the experts, shared experts and "
                                  "the router stay frozen, "
                                  "as is usual: an adapter per expert multiplies the adapter, and a trained "
                                  "router easily loses its balance.")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained in full (e.g. lm_head).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class QuantConfig(_Section):
    bits: Literal[4, 8] = Field(4, description="Base-model weight bits (QLoRA uses 4).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of the dequantised matmuls.")


class PromptConfig(_Section):
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens for prompt/prefix/p-tuning.")
    init: Literal["random", "text"] = Field("random", description="Prompt-tuning initialisation.")
    init_text: Optional[str] = Field(None, description="Text whose embeddings initialise the prompt (init: text).")
    encoder_hidden_size: int = Field(128, gt=0, description="p_tuning prompt-encoder width.")


class IA3Config(_Section):
    target_modules: Optional[list[str]] = Field(None, description="Modules rescaled by IA3; None: peft's default for the model.")
    feedforward_modules: Optional[list[str]] = Field(None, description="Subset of target_modules that are feed-forward.")


class AdapterConfig(_Section):
    bottleneck: int = Field(64, gt=0, description="Bottleneck width of each adapter.")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and MLP; pfeiffer: after MLP only.")
    dropout: float = Field(0.0, ge=0, lt=1)


METHODS = ("full", "lora", "qlora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "adapter")


class MethodConfig(_Section):
    kind: Literal[METHODS] = Field("full", description="full | lora | qlora | ia3 | prompt_tuning | p_tuning | prefix_tuning | adapter")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="lora / qlora settings.")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="qlora base quantisation.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="prompt/prefix/p-tuning settings.")
    ia3: IA3Config = Field(default_factory=IA3Config)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="bottleneck adapter settings.")

    @property
    def is_peft(self) -> bool:
        return self.kind != "full"


# ----------------------------------------------------------------------------- cluster
_SAFE = re.compile(r"^[A-Za-z0-9._:@/+-]+$")


class ClusterConfig(_Section):
    nodes: int = Field(1, gt=0)
    gpus_per_node: Optional[int] = Field(None, ge=0, description="Processes per node; default: visible GPUs (1 on CPU).")
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: Optional[str] = Field(None, description="Slurm time limit, e.g. 1-00:00:00 or 04:00:00.")
    cpus_per_task: Optional[int] = Field(None, gt=0)
    mem: Optional[str] = Field(None, description="Slurm --mem per node, e.g. 200G or 0 (all).")
    exclusive: bool = False
    gres: Optional[str] = Field(None, description="Slurm gres per node; default gpu:<gpus_per_node> on GPUs.")
    signal_grace_s: int = Field(300, gt=0, description="Seconds before the time limit at which USR1 asks for a save "
                                                        "(at least the planner's save-time estimate + 60 s).")
    max_requeues: int = Field(3, gt=0, description="job.sbatch stops requeueing once this many attempts in a row end "
                                                   "the same way: same exit code, same RUN_DIR/FAILED reason, no newer "
                                                   "checkpoint.")
    extra_sbatch: list[str] = Field(default_factory=list, description="Extra '#SBATCH' option lines, e.g. '--mail-type=END'.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment exported in job scripts.")
    container_image: Optional[str] = Field(None, description="pyxis/enroot image for srun --container-image.")
    container_mounts: list[str] = Field(default_factory=list, description="srun --container-mounts entries, SRC:DST.")
    gpu_memory: Optional[str] = Field(
        None, description="Memory of one GPU the planner plans for, e.g. 141GB: a Slurm submit's GPUs, and local runs "
                          "where nvidia-smi sees none (launcher/gpus.py); unset: 80GB, assumed. RUN_DIR/recipe.yaml "
                          "records the size each run was planned for here.")

    @field_validator("container_image")
    @classmethod
    def _image(cls, v):
        if v is not None and (not v or any(c in v for c in "\n\r\"'`$;& ")):
            raise ValueError(f"{v!r} must be one image reference without spaces, quotes or shell characters")
        return v

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, v):
        for m in v:
            if any(c in m for c in ",\n\r") or not m:
                raise ValueError(f"{m!r}: a mount is SRC[:DST[:FLAGS]] without commas or newlines")
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _gpu_mem(cls, v):
        if v is not None and not re.match(r"^\d+(\.\d+)?\s*(GB|GiB|G)?$", v, re.I):
            raise ValueError(f"{v!r} is not a size like 80GB")
        return v

    @field_validator("partition", "account", "qos", "constraint", "time", "mem", "gres")
    @classmethod
    def _token(cls, v):
        if v is not None and not _SAFE.match(v):
            raise ValueError(f"{v!r} may only contain letters, digits and . _ : @ / + -")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _lines(cls, v):
        for line in v:
            if not line.startswith("--") or "\n" in line or "\r" in line:
                raise ValueError(f"{line!r} must be one '--option[=value]' with no newline")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v):
        for k in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise ValueError(f"{k!r} is not a valid environment variable name")
        return v
