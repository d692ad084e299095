"""The one function run.py calls: check a config, dispatch it to a mode, sum up a finished run."""

from __future__ import annotations

import difflib
import logging
import os
import shlex
import sys

from simpo_jax import config as config_lib
from simpo_jax.errors import RunUnhealthy, UserError
from simpo_jax import paths
from simpo_jax.tpu_probe import avoid_tpu_probe

MODES = ("train", "eval", "export", "lr_find", "plot", "plan", "generate", "rm_eval")
BUILDING_MODES = ("train", "eval", "export", "lr_find", "generate", "rm_eval")  # load a model
DATA_MODES = ("train", "eval", "lr_find", "generate", "rm_eval")


# Exit statuses (the README's modes table): 0 only when the mode finished its work.
EXIT_USER_ERROR = 2  # a mistake in the config, the data or the output folder
EXIT_UNHEALTHY = 3  # training stopped on NaN/Inf, a collapse or a blow-up (health.py)
EXIT_DISK = 74  # the disk is full or read-only (sysexits' EX_IOERR)
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT, checkpoint saved: rerun to resume (EX_TEMPFAIL)


def main(config, mode: str = "train", argv: list[str] | None = None):
    """Runs `mode` on `config`; `argv` (run.py's sys.argv) names the config file in errors and
    builds the commands of the closing summary. A failure the user can act on is one line on
    stderr (its details appended to <output_dir>/run.log) and an exit status of its own."""
    from simpo_jax import run_folder, run_log

    try:
        # Before preflight, whose mesh check starts jax's backends: their probes log at INFO.
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "orbax", "jax._src", "etils", "datasets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        config = preflight(config, mode, config_source(argv))
        run_log.start(config.output_dir, config.process_id if config.process_id >= 0 else
                      int(os.environ.get("JAX_PROCESS_ID") or 0))
        avoid_tpu_probe()
        from simpo_jax import evaluation, lr_find, train

        modes = {"train": train.train, "eval": evaluation.evaluate_checkpoint,
                 "export": train.export_checkpoint, "lr_find": lr_find.lr_find, "plot": plot,
                 "plan": plan, "generate": generate, "rm_eval": rm_eval}
        result = modes[mode](config)
    except (UserError, RunUnhealthy) as e:  # the message is the whole story
        fail(config, e, EXIT_USER_ERROR if isinstance(e, UserError) else EXIT_UNHEALTHY, str(e))
    except Exception as e:
        target = config.export_dir if mode == "export" and config.export_dir else config.output_dir
        problem = disk_problem(e, target)
        if problem is None:
            raise  # a bug: its traceback
        fail(config, e, EXIT_DISK, problem)
    finally:
        run_folder.release_all()
    if isinstance(result, dict) and "preempted_at_step" in result:
        raise SystemExit(EXIT_PREEMPTED)
    if mode == "train" and isinstance(result, dict):
        import jax

        if jax.process_index() == 0:
            print(closing_summary(config, result, argv), flush=True)
    return result


def fail(config, error: BaseException, status: int, message: str):
    """One line on stderr, the details (traceback) in <output_dir>/run.log; exits with `status`."""
    log_file = failure_log(config.output_dir, error)
    details = f" (details: {log_file})" if log_file and status != EXIT_USER_ERROR else ""
    print(f"run.py: error: {message}{details}", file=sys.stderr, flush=True)
    # Orbax writes still in flight when the disk filled end as futures no one awaits; asyncio
    # would log each one's traceback as they are collected on the way out. The line above is
    # the story (its details in run.log).
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    raise SystemExit(status) from None


def failure_log(output_dir: str, error: BaseException) -> str | None:
    """Appends `error`'s traceback to <output_dir>/run.log (an existing folder only); its path,
    or None when it could not be written (a full or read-only disk)."""
    import datetime
    import traceback

    import tempfile

    from simpo_jax import run_folder

    if not run_folder.claimed(output_dir):  # not this run's folder (or not made yet)
        return None
    text = (f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {type(error).__name__}\n"
            + "".join(traceback.format_exception(error)))
    # A full or read-only output_dir: the temporary folder instead.
    for path in (paths.RunDir(output_dir).file("run.log"),
                 os.path.join(tempfile.gettempdir(), f"simpo_jax-run-{os.getpid()}.log")):
        try:
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


DISK_ERRNOS = {"ENOSPC": "no space left", "EDQUOT": "disk quota exceeded",
               "EROFS": "read-only file system", "EACCES": "permission denied"}


def disk_problem(error: BaseException, output_dir: str) -> str | None:
    """A full or read-only disk anywhere in `error`'s chain, as one sentence; None otherwise."""
    import errno
    import shutil

    seen, e = [], error
    while e is not None and all(e is not x for x in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    for e in seen:
        name = errno.errorcode.get(e.errno, "") if isinstance(e, OSError) else ""
        text = str(e)
        name = name or next((n for n, words in DISK_ERRNOS.items() if words in text.lower()), "")
        if name in DISK_ERRNOS:
            break
    else:
        return None
    folder = getattr(e, "filename", None) or output_dir
    folder = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    existing = folder
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing or "/").free
    if name in ("EROFS", "EACCES"):
        return (f"{folder} cannot be written ({DISK_ERRNOS[name]}); set config.output_dir (and "
                "config.export_dir) to a folder this user can write to.")
    return (f"{DISK_ERRNOS[name]} on the disk of {folder} ({free / 2**20:.1f} MiB free). Free "
            "space there or set config.output_dir (or export_dir) to a folder on another disk, "
            "then rerun the same command (training resumes from its last complete checkpoint).")


def preflight(config, mode: str, source: str = ""):
    """The checks that need nothing loaded: fields, values, mesh, data paths, checkpoints to read.

    Returns the validated run config (choice fields as enums) for the modes that build a model,
    `config` itself for the others.
    """
    if mode not in MODES:
        raise UserError(f"--mode={mode!r}: must be one of {list(MODES)}.")
    if mode not in BUILDING_MODES:
        config_lib.check_fields(config, source)
        if mode == "plot" and not os.path.exists(os.path.join(config.output_dir, "metrics.jsonl")):
            raise UserError(f"--mode=plot: no metrics.jsonl in {config.output_dir}"
                            f"{missing_output_dir(config)}; train first or check "
                            "config.output_dir.")
        return config
    config = config_lib.validate(config, source)
    check_hub_model_id(config.hub_model_id)
    from simpo_jax import run_folder

    run_folder.check_not_model_folder(config)
    check_mesh_size(config)
    if mode in DATA_MODES:
        from simpo_jax.data import rows

        rows.check_paths(config.dataset_mixer)
    if config.resume_from:
        path = paths.resolve_local(config.resume_from)
        if path is None or not os.path.isdir(path) or not os.path.basename(
                os.path.abspath(path)).isdigit():
            steps = checkpoint_steps(config.output_dir)
            folder = os.path.join(config.output_dir, "checkpoints")
            raise UserError(f"config.resume_from={config.resume_from!r}: no such checkpoint step "
                            "folder; " + (f"{folder} holds steps {steps}." if steps else
                                          f"give one like {folder}/<step>."))
    elif mode in ("eval", "export") and not checkpoint_steps(config.output_dir):
        raise UserError(f"--mode={mode}: no checkpoint in "
                        f"{os.path.join(config.output_dir, 'checkpoints')}"
                        f"{missing_output_dir(config)}. Train first (the same command without "
                        "--mode), check config.output_dir, or set config.resume_from to a "
                        "checkpoint step folder.")
    return config


def check_hub_model_id(repo_id: str) -> None:
    """The Hub's own repo-id rules, at the start rather than at the upload after training."""
    if not repo_id:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"config.hub_model_id={repo_id!r}: not a Hub repo id ({e}); give "
                        "'your-name/model-name'.") from None


def check_mesh_size(config) -> None:
    """mesh_data x mesh_fsdp x mesh_tensor against this machine's devices, before any data.

    A multi-process run learns its devices only after joining the others (build does that), so
    its mesh is checked there.
    """
    if config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return
    avoid_tpu_probe()  # before jax starts its backends
    import jax

    from simpo_jax import sharding

    sharding.mesh_shape(sharding.MeshConfig.from_config(config), jax.device_count())


def config_source(argv: list[str] | None) -> str:
    """The --config file named in `argv`, or ""."""
    args = list(argv or [])[1:]
    for i, a in enumerate(args):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
    return ""


def checkpoint_steps(output_dir: str) -> list[int]:
    """The complete checkpoint steps in output_dir (checkpoint.saved_steps)."""
    from simpo_jax.checkpoint import saved_steps  # orbax: imported only when checkpoints are read

    return saved_steps(paths.RunDir(output_dir).checkpoints)


def missing_output_dir(config) -> str:
    """', and output_dir='outputs/tiyn' does not exist (did you mean 'outputs/tiny'?)', or ''."""
    path = config.output_dir
    if os.path.isdir(path):
        return ""
    parent = os.path.dirname(os.path.abspath(path))
    siblings = sorted(d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))) \
        if os.path.isdir(parent) else []
    close = difflib.get_close_matches(os.path.basename(os.path.abspath(path)), siblings, n=1)
    return (f", and output_dir={path!r} does not exist"
            + (f" (did you mean {os.path.join(os.path.dirname(path), close[0])!r}?)" if close else ""))


def command(argv: list[str] | None, mode: str, *extra: str) -> str:
    """The user's run.py command line with --mode=`mode` (and `extra`) in place of theirs."""
    argv = list(argv or ["run.py", "--config=CONFIG"])
    args, skip = [], False
    for a in argv[1:]:
        name = a.split("=", 1)[0]
        if skip:
            skip = False
        elif name in ("--mode", "--config.hub_model_id"):
            skip = "=" not in a  # `--mode eval`: the value is the next word
        elif name not in ("--config.push_to_hub", "--config.nopush_to_hub"):
            args.append(a)
    return "python " + shlex.join([argv[0], *args, f"--mode={mode}", *extra])


SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def closing_summary(config, final: dict, argv: list[str] | None) -> str:
    """What a finished run left: final eval metrics, the model folder, how to evaluate and push it."""
    steps = checkpoint_steps(config.output_dir)
    folder = os.path.abspath(config.output_dir)
    lines = [f"Training finished at step {steps[-1] if steps else '?'}."]
    if final:
        lines.append("Final eval (all in eval_results.json): " + ", ".join(
            f"{k} {final[k]:.4g}" for k in SUMMARY_METRICS if k in final))
    else:
        lines.append("Final eval: none (no eval split; see config.dataset_splits).")
    lines.append(f"Hugging Face model folder: {folder} "
                 f"(transformers.AutoModelForCausalLM.from_pretrained({folder!r}) loads it)")
    lines.append(f"Evaluate it:        {command(argv, 'eval')}")
    if config.push_to_hub:
        lines.append(f"Pushed to the Hub as {config.hub_model_id}.")
    else:
        name = config.hub_model_id or "your-name/" + os.path.basename(folder)
        lines.append("Push it to the Hub: " + command(argv, "export", "--config.push_to_hub=True",
                                                      f"--config.hub_model_id={name}"))
    return "\n".join(lines)


def plot(config) -> list[str]:
    """--mode=plot: PNGs of <output_dir>/metrics.jsonl in <output_dir>/plots."""
    from simpo_jax import plots

    written = plots.plot_metrics(paths.RunDir(config.output_dir).metrics, config.output_dir)
    for path in written:
        print(path)
    return written


def generate(config) -> dict:
    """--mode=generate: on-policy answers, scored and paired when a reward model is set."""
    from simpo_jax.onpolicy import generate as generate_lib

    return generate_lib.generate(config)


def rm_eval(config) -> dict:
    """--mode=rm_eval: the trained policy against a baseline, judged by the reward model."""
    from simpo_jax.onpolicy import rm_eval as rm_eval_lib

    return rm_eval_lib.rm_eval(config)


def plan(config) -> dict:
    """--mode=plan: ahead-of-time compile of the train step for config.plan_target; memory report."""
    from simpo_jax import plan as plan_lib

    return plan_lib.plan(config)
