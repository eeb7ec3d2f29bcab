"""Every name the harness writes to MLflow or Optuna, or reads back from them: defined here, once.

The table of docs/schema.md lists the same names; tests/test_schema.py holds the two
together. Names with a ``{...}`` part are templates, filled by the helper functions at the end.
"""
from __future__ import annotations

# ---- MLflow run tags ---------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: a trial's run under its study's run
ROLE_TAG = "harness.role"  # "study" on a study's parent run
ROLE_STUDY = "study"
COMMAND_TAG = "harness.command"  # the command line that made a `harness train` run
PROCESS_TAG = "harness.process"  # the process (host, pid, start time) of a `harness train` run, or of a PENDING logged model
REPRODUCES_TAG = "harness.reproduces"  # on a `harness reproduce` run: the run it re-ran
EXPERIMENT_TAG = "harness.experiment"  # on a study's parent run
FAIL_REASON_TAG = "harness.fail_reason"  # why a run FAILED (or was KILLED)
EARLY_STOP_TAG = "harness.early_stop"  # a run that early stopping ended: why, and the epoch it keeps
INCOMPLETE_TAG = "harness.record_incomplete"  # a run whose final write failed part way: what it lacks
STUDY_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"  # password removed
SAMPLER_TAG = "optuna.sampler"
PRUNER_TAG = "optuna.pruner"
DIRECTION_TAG = "optuna.direction"
TRIAL_NUMBER_TAG = "optuna.trial_number"
TRIAL_STATE_TAG = "optuna.trial_state"
HARNESS_TAG_PREFIXES = ("harness.", "optuna.")  # a run holding one of these is a record of the harness
BEST_RUN_TAG = "best_run_id"
BEST_PARAMS_TAG = "best_params"
BEST_PARAM_TAG = "best.{param}"
NOTE_TAG = "mlflow.note.content"  # MLflow's own: the run's description, Markdown on its page
RUN_NAME_TAG = "mlflow.runName"  # MLflow's own: setting it renames the run
STUDY_RUN_TAG = "harness.study_run"  # on an `mlflow run` that resumed a study: the study's parent run
RESUMED_TAG = "harness.resumed_at_epoch"  # a run continued from its checkpoint: the epoch it went on from
RESUMED_FROM_TAG = "harness.resumed_from"  # a retried trial's run that went on from an earlier attempt's: that run
# Provenance, on every run (harness.provenance): MLflow's own names where it has them.
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the commit of the experiment's code ("not a git checkout")
SOURCE_NAME_TAG = "mlflow.source.name"  # MLflow's own: the experiment's file
SOURCE_TYPE_TAG = "mlflow.source.type"  # MLflow's own: LOCAL
USER_TAG = "mlflow.user"  # MLflow's own
SOURCE_DIRTY_TAG = "harness.source.git.dirty"  # the experiment's code has uncommitted changes: true, false
SOURCE_DIFF_TAG = "harness.source.git.diff"  # where it has: the artifact holding them (DIFF_ARTIFACT)
HARNESS_COMMIT_TAG = "harness.git.commit"  # the harness's own code
HARNESS_DIRTY_TAG = "harness.git.dirty"
HARNESS_DIFF_TAG = "harness.git.diff"
PACKAGES_TAG = "harness.packages_sha256"  # of the installed packages' list (REQUIREMENTS_ARTIFACT)
DATA_TAG = "harness.data_sha256.{split}"  # train, valid, test as the experiment returned them; held_out
HOST_TAG = "harness.host"
CPU_TAG = "harness.cpu"
GPU_TAG = "harness.gpu"  # the GPU's name where the run used CUDA
GPU_DRIVER_TAG = "harness.gpu_driver"
CUDA_TAG = "harness.cuda"  # the CUDA version torch was built with
PYTHON_TAG = "harness.python"

# ---- MLflow Model Registry: a registered model version's tags (beside STUDY_TAG, TRIAL_NUMBER_TAG) and alias -----
OBJECTIVE_NAME_TAG = "harness.objective"  # the metric the study selected its trials on
OBJECTIVE_VALUE_TAG = "harness.objective_value"  # the trial's value of it
CHAMPION_ALIAS = "champion"  # moved to each version `harness register` / `search --register` makes

# ---- MLflow run params (besides every field of the resolved config) ------------------------------
TRIAL_NUMBER_PARAM = "trial_number"
TORCH_VERSION_PARAM = "torch_version"
# torch's intra-op threads while the run trained: a CPU run's bits depend on it (reproduce re-runs with it).
TORCH_THREADS_PARAM = "torch_threads"
EXPERIMENT_SHA_PARAM = "experiment_sha256"  # of the file that defined the run's experiment
# On a study's parent run: its search space and settings.
SPACE_PARAM = "space.{name}"  # space.lr, space.epochs, space.optimizer_loss, space.<hyperparameter>
SAMPLER_PARAM = "study.sampler"
PRUNER_PARAM = "study.pruner"
DIRECTION_PARAM = "study.direction"
REPORT_EVERY_PARAM = "study.report_every"
BATCH_PARAM = "study.batch"  # trials trained together (harness search --batch)
PRUNER_ARGS_PARAM = "study.pruner_args"  # every setting of the pruner, Optuna's defaults included (JSON)
OBJECTIVES_PARAM = "study.objectives"  # a study with two objectives: their names, space-separated

# ---- MLflow metrics ----------------------------------------------------------------------------
TRAIN_LOSS = "train_loss"  # per epoch, step = epoch
TEST_LOSS = "test_loss"
VALID_LOSS = "valid_loss"  # per epoch, when the run has validation data: what a search selects on
LEARNING_RATE = "learning_rate"  # per epoch, with a learning-rate schedule: the rate of the epoch's first step
BEST_EPOCH = "best_epoch"  # with early stopping: the epoch whose weights the run keeps
CURVE = "{split}_{metric}"  # train_<m>, valid_<m>, test_<m>: an experiment's extra per-epoch metrics
FINAL = "final_{metric}"  # final_train_loss, final_test_loss, final_<m>
FINAL_TEST_LOSS = "final_test_loss"
ERROR = "{scalar}_error"  # an experiment's scalar against its declared truth
BEST_VALUE = "best_value"  # on a study's parent run, step = trials so far
BEST_TRIAL_NUMBER = "best_trial_number"
N_TRIALS = "n_trials"
BEST = "best_{metric}"  # the best trial's final metrics, on the parent run
OBJECTIVE = "objective_{name}"  # a trial's value for each objective of a study with two (--objectives)

# ---- MLflow artifacts --------------------------------------------------------------------------
STATE_DICT = "state_dict.pt"
CONFIG = "config.json"
# A run's checkpoints while it trains: two slots, written in turn, so a write cut short leaves the other.
CHECKPOINT = "checkpoints/checkpoint-{slot}.pt"
LOSS_CURVES = "loss_curves.png"
PREDICTIONS = "predictions.png"
TRIALS_CSV = "trials.csv"
BEST_PARAMS_JSON = "best_params.json"
OPTIMIZATION_HISTORY = "optimization_history.png"
PARALLEL_COORDINATE = "parallel_coordinate.png"
PARAM_IMPORTANCES = "param_importances.png"
PARETO_FRONT_CSV = "pareto_front.csv"  # a study with two objectives: its Pareto front, one row per trial
PARETO_FRONT = "pareto_front.png"  # Optuna's plot_pareto_front
# Provenance's big parts, named by their content's sha256 (16 hex digits): on a `harness train` run
# itself; a search's on its parent run, once per process, which its trials' tags point to.
REQUIREMENTS_ARTIFACT = "provenance/requirements-{sha}.txt"
DIFF_ARTIFACT = "provenance/diff-{sha}.patch"

# ---- Optuna trial params (besides the space's own names: lr, epochs, hyperparameters) -------------
PAIR_TRIAL_PARAM = "optimizer_loss"  # "<optimizer>+<loss>", logged as the run's params optimizer and loss

# ---- Optuna user attrs -------------------------------------------------------------------------
RUN_ATTR = "mlflow_run_id"  # a trial's run
PARENT_ATTR = "mlflow_parent_run_id"  # a study's parent run
WORKER_ATTR = "harness.worker"  # host:pid:start-time of the process running a trial
# A running trial's epochs done and latest selection value, written by its worker every ~10 s for the
# parent run's live description: {"trial": number, "done": .., "epochs": .., "value": ..}.
PROGRESS_ATTR = "harness.progress"
FAIL_REASON_ATTR = "fail_reason"  # why a trial failed
# One attempt's own attrs: a retry of a trial (Optuna's retry callbacks copy every user attr) starts
# without them, so that until it has its own run it names none, not the run of the attempt it retries.
ATTEMPT_ATTRS = (RUN_ATTR, WORKER_ATTR, PROGRESS_ATTR, FAIL_REASON_ATTR)
SPACE_ATTR = "harness.space"  # a study's search space, as JSON
STUDY_EXPERIMENT_ATTR = "harness.experiment"  # a study's experiment
# The sha256 of the file that defines a study's experiment: a study resumes only with the same file.
STUDY_EXPERIMENT_SHA_ATTR = "harness.experiment_sha256"
# Each change of that file a resume accepted (--allow-changed-experiment): [{"trial", "sha256", "was"}].
EXPERIMENT_CHANGES_ATTR = "harness.experiment_changes"
OBJECTIVES_ATTR = "harness.objectives"  # a study's objectives, by name (a study resumes only with them)
# A completed trial's final values on the data it was selected on ({"valid_loss": .., "valid_accuracy": ..});
# its test values stay in its run, out of the study's storage.
METRICS_ATTR = "harness.metrics"

# Trial state -> the status of its run.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def final(metric: str) -> str:
    return FINAL.format(metric=metric)


def best(metric: str) -> str:
    return BEST.format(metric=metric)


def space_param(name: str) -> str:
    return SPACE_PARAM.format(name=name)


def objective(name: str) -> str:
    return OBJECTIVE.format(name=name)


def best_param(param: str) -> str:
    return BEST_PARAM_TAG.format(param=param)


def error(scalar: str) -> str:
    return ERROR.format(scalar=scalar)


def trial_run_name(number: int) -> str:
    """A trial's run name (a pruned trial's run adds why it stopped)."""
    return f"trial-{number}"


def is_curve(metric: str) -> bool:
    """Per-epoch metrics are train_<m>, valid_<m>, test_<m> and learning_rate; everything else a run logs is a final value."""
    return metric.startswith(("train_", "valid_", "test_")) or metric == LEARNING_RATE


def tag_filter(tag: str) -> str:
    """``tags.`<tag>``` for an MLflow filter string (dots in a tag name need the backquotes)."""
    return f"tags.`{tag}`"


def names() -> dict[str, set[str]]:
    """Every name above by kind, for the check of docs/schema.md."""
    kinds = {"TAG": "tags", "TRIAL_PARAM": "trial params", "PARAM": "params", "ATTR": "attrs", "JSON": "artifacts",
             "ALIAS": "aliases"}
    out: dict[str, set[str]] = {kind: set() for kind in ("tags", "params", "metrics", "artifacts", "attrs",
                                                         "trial params", "aliases")}
    for key, value in globals().items():
        if not key.isupper() or not isinstance(value, str) or key == "ROLE_STUDY":
            continue
        kind = next((k for suffix, k in kinds.items() if key.endswith(suffix)), None)
        if kind is None:
            kind = "artifacts" if "." in value else "metrics"
        out[kind].add(value)
    return out


def data_tag(split: str) -> str:
    return DATA_TAG.format(split=split)


def checkpoint_name(slot: int) -> str:
    return CHECKPOINT.format(slot=slot)
