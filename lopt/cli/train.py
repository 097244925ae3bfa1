"""Meta-train a learned optimizer from a config file.

    python scripts/meta_train.py --config=configs/quickstart.py --workdir=runs/quickstart \
        --config.estimator.std=0.01

``--config`` is a config file's path or the name of a config shipped with lopt (``quickstart``,
``elo``, ...: the repository's ``configs/``), which works from any directory. ``--module``
imports a module of your own first (its registered task, optimizer, estimator, ...; or list it
in ``config.modules``; docs/extending.md). Rerunning with
the same workdir resumes from the latest checkpoint. Particles are sharded over every visible
device (``--config.num_devices`` to limit); on a CPU, ``--cpu_devices=N`` runs the CPU as N
devices, by default (``auto``) one per physical core as far as the particle pairs split
(docs/performance.md, "Speed on a CPU"); ``--multihost`` joins a multi-process run first
(see README, "Several devices and hosts"). Outputs: config.json, metrics.jsonl, checkpoints/,
export/optimizer.safetensors and plots/meta_loss.png in the workdir.

Every way a run can end early is one line on stderr and an exit code: a config error, a
workdir in use, no intact checkpoint or a failed write (full disk, permissions) 2; a health
stop 1; SIGTERM or SIGINT 143 or 130 (after a checkpoint of the step reached); a lost process
of a multi-process run 75 (EX_TEMPFAIL: restart every process to resume).
"""

from __future__ import annotations

import os
import sys

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from lopt.cli.common import define_config, import_user_modules  # noqa: E402
from lopt.training import config as config_lib  # noqa: E402
from lopt.training import distributed, loop  # noqa: E402
from lopt.training.checkpoint import CheckpointError, describe_latest  # noqa: E402
from lopt.training.faults import WriteFailed  # noqa: E402
from lopt.training.preemption import Interrupted  # noqa: E402
from lopt.training.workdir import WorkdirInUseError  # noqa: E402
from tasks.registry import ConfigError  # noqa: E402
from tasks.user_code import merge  # noqa: E402

_CONFIG = define_config("config", "quickstart", "Experiment config: a file's path or a shipped "
                        "config's name.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Directory for outputs and checkpoints.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process run (jax.distributed.initialize) before anything else."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (else $LOPT_COORDINATOR_ADDRESS or the scheduler's)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (else from env).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (else from env).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", distributed.HEARTBEAT_TIMEOUT,
    "--multihost: seconds without a heartbeat after which JAX's coordination service declares a "
    "process dead and ends the others; a lost process is reported (one line, exit 75) after "
    "half of it (docs/distributed.md, 'Preemption and lost hosts').", lower_bound=2,
)
_CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices", "auto",
    "CPU runs: present the CPU as this many devices and shard the particles over them (N >= 1; "
    "docs/distributed.md). auto (the default): the physical cores, at most as many as there "
    "are antithetic pairs and so that the particles split into whole pairs per device; 1 with "
    "fewer than 2 pairs, with --multihost, or when XLA_FLAGS sets the device count. No effect "
    "on GPU/TPU runs.",
)

#: Exit code of the processes left when one of a multi-process run is lost (EX_TEMPFAIL).
LOST_PROCESS_EXIT = 75


def _lost(workdir: str, newline: bool, processes: list[int], why: str) -> None:
    """HostWatch's verdict: one line, then exit at once (the main thread may be blocked in a
    collective, and JAX's own shutdown would wait for the lost process)."""
    names = ", ".join(str(p) for p in processes)
    line = (f"error: lost process {names} of {jax.process_count()} ({why}); "
            f"{describe_latest(os.path.join(workdir, 'checkpoints'))}; restart every process "
            "with the same command to resume from it")
    sys.stdout.flush()
    sys.stderr.write(("\n" if newline else "") + line + "\n")
    sys.stderr.flush()
    os._exit(LOST_PROCESS_EXIT)


def _cpu_devices(value: str) -> int:
    """``--cpu_devices`` as a device count: N as given, or ``auto`` resolved from the config's
    particle count (:func:`lopt.training.distributed.auto_cpu_devices`), capped by its
    ``num_devices``; 1 (JAX's default, so an ``XLA_FLAGS`` device count wins) under
    ``--multihost`` (each process's devices are part of one mesh) or with that flag set."""
    if value.strip().lower() != "auto":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"cpu_devices must be an integer >= 1 or 'auto', got {value!r}") from None
    if _MULTIHOST.value or distributed.forced_host_devices():
        return 1
    try:  # a config error is reported by the run itself, in its own words
        config = _CONFIG.value
        particles = int(config.unroll.num_particles)
        cap = int(config.get("num_devices", 0) or 0)
    except Exception:  # noqa: BLE001
        return 1
    cores = distributed.physical_cores()
    return distributed.auto_cpu_devices(particles, min(cores, cap) if cap > 0 else cores)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:  # before anything starts JAX's backends
        distributed.set_cpu_devices(_cpu_devices(_CPU_DEVICES.value))
    except ValueError as e:
        print(f"error: --cpu_devices: {e}", file=sys.stderr)
        return 2
    watch = None
    if _MULTIHOST.value:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout=_HEARTBEAT.value)
        newline = _PROGRESS.value and distributed.is_primary()
        watch = distributed.HostWatch(
            _HEARTBEAT.value / 2, lambda p, why: _lost(os.path.abspath(_WORKDIR.value), newline, p, why)
        ).start()
    try:
        code = _train()
    except Exception:
        if watch is not None:  # a collective failed: if a process was lost, the watch says so
            watch.wait()  # (and ends this process)
        raise
    if watch is not None:  # an end every process comes to: no longer watched, nor watching
        watch.finished()
    return code


def _train() -> int:
    try:  # the config loaded while flags parsed (lopt.cli.common.ConfigParser)
        config = _CONFIG.value
        modules = import_user_modules()  # recorded in config.json with the config's own
        if modules:
            config = config_lib.with_modules(config, merge(config.get("modules") or (), modules))
        summary = loop.train(config, _WORKDIR.value, progress=_PROGRESS.value)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (WorkdirInUseError, CheckpointError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    if not distributed.is_primary():
        return 0
    m = summary["last_metrics"]
    rate = summary["inner_steps_per_sec"]
    on = f" on {jax.device_count()} {jax.default_backend()} device(s)"
    print(f"done: outer step {m.get('step')}, meta-loss {m.get('meta_loss', float('nan')):.4f}, "
          f"{rate:,.0f} inner steps/s{on}" if rate else "done")
    print(f"  health:     {int(m.get('num_skipped', 0))} outer steps skipped (non-finite "
          f"meta-gradient); last log: {100 * m.get('clipped_share', 0.0):.0f}% of meta-loss terms "
          f"at the clip, {100 * m.get('nonfinite_share', 0.0):.0f}% of inner losses non-finite")
    if summary.get("eval"):
        e = summary["eval"]
        share = f", {100 * e['share']:.0f}% of the run's time" if e.get("share") is not None else ""
        print(f"  eval:       {e['evaluations']} held-out evaluations, {e['seconds']:.1f} s (tuned Adam "
              f"{e['baseline_seconds']:.1f} s of it){share}; plot {e['plot']}")
    print(f"  workdir:    {summary['workdir']}")
    print(f"  metrics:    {summary['metrics']}")
    print(f"  checkpoint: {summary['checkpoints']}")
    print(f"  export:     {summary['export']}")
    print(f"  plot:       {summary['plot']}")
    return 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-train`` command."""
    from lopt.cli.common import run_app

    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
