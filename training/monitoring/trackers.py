"""The sinks a run reports to (`logging.report_to`): TensorBoard, Weights & Biases, MLflow.

Each gets the same things from training/monitoring/metrics.py, on rank 0 only:

    start(hparams, texts, step)      hparams (model, method, lr, batch, ...) and texts (recipe,
                                     ds_config, plan, the MFU formula, the time split)
    scalars(step, {tag: value})      train/*, eval/*, time/*, data/* (the tags of metrics.py)
    text(tag, text, step)            e.g. trainable_parameters
    samples(step, [(prompt, completion)])   generations of train.eval_prompts
    finish(final, step, finished)    hparam/final_eval_loss when the run finished; close

TensorBoard: RUN_DIR/tensorboard; purge_step drops what a crashed attempt logged after the
checkpoint a resume starts from, so every step shows once; hparams are written at the end.
wandb: RUN_DIR/wandb (WANDB_MODE=offline keeps it there; `wandb sync` uploads it); config holds
the hparams and the whole recipe, texts are files of the run, scalars use train/step as their
x-axis so a resumed attempt continues the same run (same id, resume="allow"); offline attempts
are one folder each (wandb/offline-run-*-<id>), sync them oldest first.
MLflow: MLFLOW_TRACKING_URI, else a file store RUN_DIR/mlruns; params are the hparams (the first
attempt's values stay: MLflow forbids changing a param), texts are artifacts, a resumed attempt
reopens the same run. Neither wandb nor MLflow can drop points, so the steps a resumed attempt
redoes appear twice there (with the same values: resume is exact).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from zerotune.core.errors import UserError
from zerotune.core.layout import MLRUNS_DIR, TENSORBOARD_DIR

STEP_METRIC = "train/step"  # wandb's x-axis for every metric


def samples_markdown(pairs: list[tuple[str, str]]) -> str:
    """A two-column table (TensorBoard's text tab renders markdown)."""
    def cell(s: str) -> str:
        return (s.replace("|", "\\|").replace("\n", "<br>") or "(empty)") if s is not None else ""
    return "\n".join(["| prompt | completion |", "|---|---|", *(f"| {cell(p)} | {cell(c)} |" for p, c in pairs)])


class TrackerError(UserError, RuntimeError):
    """A tracker that cannot start (not logged in, a server out of reach)."""


class Tracker:
    """The interface; every method may be left as is by a sink that has nothing to do."""
    name = ""

    def start(self, hparams: dict, texts: list[tuple[str, str]], step: int) -> None:
        for tag, text in texts:
            self.text(tag, text, step)

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def samples(self, step: int, pairs: list[tuple[str, str]]) -> None:
        self.text("eval/samples", samples_markdown(pairs), step)

    def flush(self) -> None: ...

    def finish(self, final: dict[str, float | None], step: int, finished: bool) -> None: ...


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ----------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=10)
        self.hp: dict = {}

    def start(self, hparams, texts, step):
        self.hp = hparams
        super().start(hparams, texts, step)

    def scalars(self, step, values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, tag, text, step):
        self.writer.add_text(tag, text, step)

    def flush(self):
        self.writer.flush()

    def finish(self, final, step, finished):
        if finished:  # the HPARAMS tab: the recipe's knobs with the final eval loss
            from torch.utils.tensorboard.summary import hparams
            metric = {k: (v if v is not None else float("nan")) for k, v in final.items()}
            fw = self.writer._get_file_writer()  # the same event file, so a resumed run has one hparams entry
            for summary in hparams(self.hp, metric):
                fw.add_summary(summary, step)
            for k, v in metric.items():
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.writer.close()


# ----------------------------------------------------------------------------- Weights & Biases
class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, recipe, run_id: str, project: str):
        import wandb
        self.wandb = wandb
        try:
            self.run = wandb.init(project=project, name=recipe.name, id=run_id, resume="allow", dir=str(run_dir),
                                  config={"recipe": recipe.model_dump(mode="json")},
                                  settings=wandb.Settings(console="off"))  # the console is already in the job log
        except Exception as e:
            raise TrackerError(f"logging.report_to: wandb could not start ({_first_line(e)}); run `wandb login`, "
                               "or set WANDB_MODE=offline to keep the run in RUN_DIR/wandb") from None
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def start(self, hparams, texts, step):
        self.run.config.update(hparams, allow_val_change=True)  # a resume on other GPUs changes world_size
        super().start(hparams, texts, step)

    def scalars(self, step, values):
        self.run.log({STEP_METRIC: step, **values})

    def text(self, tag, text, step):
        path = Path(self.run.dir) / f"{tag}.md"  # a file of the run (the Files tab)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def samples(self, step, pairs):
        table = self.wandb.Table(columns=["step", "prompt", "completion"], data=[[step, p, c] for p, c in pairs])
        self.run.log({STEP_METRIC: step, "eval/samples": table})

    def finish(self, final, step, finished):
        if finished:
            for k, v in final.items():
                if v is not None:
                    self.run.summary[k] = v
        self.run.finish(exit_code=0 if finished else 1)


# ----------------------------------------------------------------------------- MLflow
def mlflow_uri(run_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / MLRUNS_DIR).resolve().as_uri()


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, recipe, run_id: str | None, experiment: str):
        self.uri = mlflow_uri(run_dir)
        if urlparse(self.uri).scheme in ("", "file"):  # MLflow 3 asks for this opt-in to its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=self.uri)
        self.reopened = False
        try:
            self.run_id = self._open(recipe, run_id, experiment)
        except Exception as e:
            raise TrackerError(f"logging.report_to: mlflow could not start at {self.uri} ({_first_line(e)})") from None

    def _open(self, recipe, run_id: str | None, experiment: str) -> str:
        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.reopened = True
                return run_id
            except Exception:  # another store than the first attempt's: a new run
                pass
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=recipe.name, tags={"zerotune.run_dir": str(recipe.run_dir)})
        return run.info.run_id

    def start(self, hparams, texts, step):
        from mlflow.entities import Param
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in hparams.items() if k not in have]
        if new:
            self.client.log_batch(self.run_id, params=new)
        super().start(hparams, texts, step)

    def scalars(self, step, values):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def text(self, tag, text, step):
        self.client.log_text(self.run_id, text, f"{tag}.md")

    def samples(self, step, pairs):
        self.client.log_text(self.run_id, samples_markdown(pairs), f"eval/samples/step-{step:06d}.md")

    def finish(self, final, step, finished):
        if finished:
            self.scalars(step, {k: v for k, v in final.items() if v is not None})
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")
