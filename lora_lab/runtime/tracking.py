"""Weights & Biases tracking behind a small interface, so the trainer never touches wandb directly.

mode "auto" means online when an API key is configured (WANDB_API_KEY or a netrc entry for the W&B
server), else offline (runs land in ./wandb/offline-run-* under the run directory; `wandb sync`
uploads them). "disabled" logs nothing. A tracker always finishes, also when training raises.

Online runs never stop training: when the W&B server cannot be reached (no network, DNS failure,
server down) or `wandb.init` fails for any other reason, the run is logged offline in the same
directory instead, and one line on stderr says so and how to upload it later. If even that fails,
training goes on without W&B logging (again one line says so). An offline run ends with one line
saying where it is and the ``wandb sync <folder>`` that uploads it.

Before going online, one TCP connection to the server (or to the HTTP(S) proxy in between) is tried
for at most PROBE_TIMEOUT seconds, so a machine without network falls back at once. When the server
is reachable, `wandb.init` gets `init_timeout` seconds: the `init_timeout` argument, else the
WANDB_INIT_TIMEOUT environment variable, else DEFAULT_INIT_TIMEOUT.

With ``logger.log_model=true`` a completed run is also logged as a model artifact (``Tracker.log_model``):
the trainer hands over the files (and the PEFT adapter folder it exported), the tracker uploads them.

``logger=csv`` and ``logger=tensorboard`` (``logger.backend``) log the same keys into the run folder
instead, behind the same interface (``CsvTracker``, ``TensorBoardTracker``; ``file_tracker``).
"""
from __future__ import annotations

import configparser
import csv
import io
import ipaddress
import json
import math
import netrc
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import wandb

from lora_lab.errors import first_line
from lora_lab.runtime import records

DEFAULT_BASE_URL = "https://api.wandb.ai"
# Seconds wandb.init may take online once the server answers. W&B's own default is 90 s; a working
# connection, also a slow one, needs a few seconds, and the price of running out is only an offline
# run to sync later.
DEFAULT_INIT_TIMEOUT = 30.0
# Seconds to open one TCP connection to the server (name lookup included) before trying wandb.init.
PROBE_TIMEOUT = 5.0
# A run's model artifact holds its best epoch's state; "latest" moves to the newest version.
MODEL_ALIASES = ("best", "latest")


def base_url() -> str:
    """The W&B server wandb talks to: WANDB_BASE_URL, else the host `wandb login --host` saved, else
    W&B's cloud."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url.rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb").expanduser()
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
        url = parser.get("default", "base_url", fallback="")
    except (configparser.Error, OSError, UnicodeDecodeError):
        url = ""
    return url.rstrip("/") or DEFAULT_BASE_URL


def netrc_path() -> Path:
    """The netrc file wandb keeps its API keys in: NETRC, else ~/.netrc, else ~/_netrc."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    home = Path.home()
    return home / ".netrc" if (home / ".netrc").exists() or not (home / "_netrc").exists() else home / "_netrc"


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc(str(netrc_path())).authenticators(urlsplit(base_url()).hostname or "api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def resolve_init_timeout(value: float | None = None) -> float:
    """Seconds wandb.init may take online: ``value``, else WANDB_INIT_TIMEOUT, else DEFAULT_INIT_TIMEOUT."""
    if value is not None:
        return float(value)
    try:
        return float(os.environ["WANDB_INIT_TIMEOUT"])
    except (KeyError, ValueError):
        return DEFAULT_INIT_TIMEOUT


def _host_port(url: str) -> tuple[str, int] | None:
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname else None


def _is_loopback(host: str) -> bool:
    """Requests to this machine never go through the proxy variables' proxy (wandb's Go HTTP client)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connection_target(url: str) -> tuple[str, int, bool] | None:
    """Where a request to ``url`` first connects: the server, or the proxy configured for it (wandb's
    own WANDB_HTTP(S)_PROXY, else the usual HTTP(S)_PROXY / NO_PROXY variables, which leave this
    machine's own addresses alone). None: unknown."""
    scheme = urlsplit(url).scheme or "https"
    server = _host_port(url)
    if server is None:
        return None
    proxy = os.environ.get(f"WANDB_{scheme.upper()}_PROXY")
    if not proxy and not _is_loopback(server[0]) and not urllib.request.proxy_bypass(server[0]):
        proxy = urllib.request.getproxies().get(scheme)
    if proxy:
        via = _host_port(proxy)
        return None if via is None else (*via, True)
    return (*server, False)


def unreachable_reason(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why no TCP connection to the W&B server at ``url`` (or its proxy) opens within ``timeout``
    seconds, or None when one does (or when there is nothing to try)."""
    target = _connection_target(url)
    if target is None:
        return None
    host, port, via_proxy = target
    outcome: dict = {}

    def connect() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["connected"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=connect, name="wandb-reachability", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome.get("connected"):
        return None
    where = f"{'proxy ' if via_proxy else ''}{host}:{port}"
    if "error" in outcome:
        return f"cannot connect to {where}: {first_line(outcome['error'])}"
    return f"no connection to {where} within {timeout:g} s"


class Tracker:
    def __init__(self, run=None):
        self.run = run
        self._run_id = getattr(run, "id", None)

    @classmethod
    def start(cls, config: dict, mode: str = "auto", project: str = "lora_lab", name: str | None = None,
              group: str | None = None, tags=None, directory: str | Path | None = None,
              entity: str | None = None, job_type: str | None = None, run_id: str | None = None,
              init_timeout: float | None = None) -> Tracker:
        """Start a W&B run. ``run_id``: continue that run (or start it under that id) instead of a new
        one. ``init_timeout``: seconds wandb.init may take online (see the module's docstring)."""
        mode = resolve_mode(mode)
        if mode == "disabled":
            return cls(None)
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        arguments = dict(project=project, entity=entity, name=name, group=group, tags=list(tags or []),
                         config=config, job_type=job_type, dir=str(directory) if directory else None,
                         reinit="finish_previous")
        if run_id:
            arguments.update(id=run_id, resume="allow")
        if mode != "online":
            return cls(wandb.init(mode=mode, **arguments))

        timeout = resolve_init_timeout(init_timeout)
        reason = unreachable_reason(base_url(), min(PROBE_TIMEOUT, timeout))
        if reason is None:
            try:
                return cls(wandb.init(mode="online", settings={"init_timeout": timeout}, **arguments))
            except Exception as error:  # noqa: BLE001 - whatever failed, training goes on offline
                reason = first_line(error)
        return cls._offline_instead(wandb, reason, arguments)

    @classmethod
    def _offline_instead(cls, wandb, reason: str, arguments: dict) -> Tracker:
        try:
            run = wandb.init(mode="offline", **arguments)
        except Exception as error:  # noqa: BLE001 - training goes on without W&B
            print(f"lora-lab: W&B unreachable ({reason}) and offline logging failed too ({first_line(error)}); "
                  f"training goes on without W&B logging", file=sys.stderr, flush=True)
            return cls(None)
        folder = offline_dir(run)
        print(f"lora-lab: W&B unreachable ({reason}); logging offline to {folder}, "
              f"upload later with: wandb sync {folder}", file=sys.stderr, flush=True)
        return cls(run)

    @classmethod
    def attach(cls, run, config: dict, name: str | None = None) -> Tracker:
        """Log into a run that already exists, e.g. the one a W&B sweep agent started for a trial
        (the sweep groups its runs): the trial's parameters stay, the resolved config is added."""
        run.config.update({k: v for k, v in config.items() if k not in run.config}, allow_val_change=True)
        if name:
            run.name = f"{name}-{run.id}"
        return cls(run)

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        """The W&B run's id (kept after finish), to continue the run later; None when disabled."""
        return self.run.id if self.run is not None else self._run_id

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: str | Path) -> None:
        if self.run is not None:
            self.run.log({key: wandb.Image(str(path))})

    def mark_preempting(self) -> None:
        """Tell W&B the run is about to be stopped and will be continued (it shows as preempted,
        not crashed). A no-op without a run; never raises."""
        if self.run is None:
            return
        try:
            self.run.mark_preempting()
        except Exception:  # noqa: BLE001 - a notice to W&B must not disturb the shutdown
            pass

    def wants_model(self, record: dict) -> bool:
        """Whether ``log_model`` logs anything: a W&B run, and ``logger.log_model=true`` in the record's config."""
        logger = (record.get("config") or {}).get("logger") or {}
        return self.run is not None and bool(logger.get("log_model"))

    def log_model(self, run_dir: str | Path, record: dict, adapter_dir: str | Path | None = None) -> None:
        """With ``logger.log_model=true`` (read from the record's config): log the run's record and
        trainable state, and the PEFT adapter folder ``adapter_dir`` when given (for LoRA and DoRA the
        trainer exports it to ``<run dir>/peft_adapter``), as the model artifact ``model-<W&B run id>``
        with the aliases "best" (the files hold the best epoch) and "latest". A no-op without a W&B run;
        a failure is one line on stderr, never an error: the run itself is complete."""
        if not self.wants_model(record):
            return
        try:
            artifact = model_artifact(self.run.id, Path(run_dir), record, adapter_dir)
            self.run.log_artifact(artifact, aliases=list(MODEL_ALIASES))
        except Exception as error:  # noqa: BLE001 - the record is written; logging it must not fail the run
            print(f"lora-lab: the model artifact was not logged to W&B ({type(error).__name__}: "
                  f"{first_line(error)})", file=sys.stderr, flush=True)

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run; an offline one ends with a line saying where it is and how to upload it."""
        if self.run is not None:
            offline = offline_dir(self.run)
            self.run.finish(exit_code=exit_code)
            self.run = None
            if offline is not None:
                print(f"[lora_lab] W&B run offline in {offline}; upload it with: wandb sync {offline}", flush=True)


def offline_dir(run) -> Path | None:
    """The offline-run-* folder of an offline W&B run; None for an online one."""
    if not getattr(run, "offline", False):
        return None
    return Path(run.dir).resolve().parent  # run.dir is the files/ folder of offline-run-*


class CsvTracker(Tracker):
    """``logger=csv``: what the W&B tracker logs, as files in the run folder: ``metrics.csv`` (one row
    per logged step: the column ``step``, then one per key, in the order keys first appear),
    ``summary.json`` (the summary) and ``table-<key>.csv`` per table. Every write replaces the file
    atomically; a resumed run reads them back and goes on (a step logged again replaces its values)."""

    METRICS_FILE = "metrics.csv"
    SUMMARY_FILE = "summary.json"

    def __init__(self, directory: str | Path):
        super().__init__(None)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows, self.columns = self._read_metrics()
        summary_path = self.directory / self.SUMMARY_FILE
        self.values = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    @property
    def enabled(self) -> bool:
        return True

    def _read_metrics(self) -> tuple[dict[int, dict], list[str]]:
        path = self.directory / self.METRICS_FILE
        if not path.exists():
            return {}, []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = [c for c in reader.fieldnames or [] if c != "step"]
            rows = {int(row["step"]): {k: _parse(v) for k, v in row.items() if k != "step" and v != ""} for row in reader}
        return rows, columns

    def log(self, metrics: dict, step: int | None = None) -> None:
        step = max(self.rows, default=0) if step is None else int(step)
        self.rows.setdefault(step, {}).update(metrics)
        self.columns += [k for k in metrics if k not in self.columns]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["step", *self.columns], lineterminator="\n")
        writer.writeheader()
        writer.writerows({"step": s, **self.rows[s]} for s in sorted(self.rows))
        records.write_text(self.directory / self.METRICS_FILE, out.getvalue())

    def summary(self, values: dict) -> None:
        self.values.update(values)
        finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in self.values.items()}
        records.write_json(self.directory / self.SUMMARY_FILE, finite)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows([columns, *rows])
        records.write_text(self.directory / f"table-{key.replace('/', '_')}.csv", out.getvalue())


def _parse(text: str):
    try:
        return float(text)
    except ValueError:
        return text


class TensorBoardTracker(Tracker):
    """``logger=tensorboard``: what the W&B tracker logs, as TensorBoard event files in the run folder
    (``tensorboard --logdir <run folder>``): every number a scalar under its W&B key at its step, the
    summary's numbers as scalars at the last step logged, text and tables as text. Needs the
    tensorboard package (``pip install "lora_lab[tensorboard]"``)."""

    def __init__(self, directory: str | Path):
        super().__init__(None)
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: tensorboard

        self.writer = SummaryWriter(log_dir=str(directory))
        self.last_step = 0

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        step = self.last_step if step is None else int(step)
        self.last_step = max(self.last_step, step)
        self._write(metrics, step)

    def _write(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
            elif value is not None:
                self.writer.add_text(key, str(value), global_step=step)
        self.writer.flush()

    def summary(self, values: dict) -> None:
        self._write(values, self.last_step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns),
                 *("| " + " | ".join(str(v).replace("\n", " ") for v in row) + " |" for row in rows)]
        self._write({key: "\n".join(lines)}, self.last_step)

    def finish(self, exit_code: int = 0) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


FILE_TRACKERS = {"csv": CsvTracker, "tensorboard": TensorBoardTracker}  # logger.backend besides wandb


def file_tracker(backend: str, directory: str | Path) -> Tracker:
    """The tracker of ``logger.backend`` csv or tensorboard, logging into the run folder ``directory``."""
    return FILE_TRACKERS[backend](directory)


def model_artifact_name(run_id: str) -> str:
    """The name a run's model artifact has in its project: a sweep's best run's model is
    ``<entity>/<project>/model-<its run id>:best``."""
    return f"model-{run_id}"


def model_artifact(run_id: str, run_dir: Path, record: dict, adapter_dir: str | Path | None = None):
    """A W&B model artifact of a completed run: record.json, the trainable state and, when given, the
    PEFT adapter folder (under its own name)."""
    files = [run_dir / records.RECORD_FILE, run_dir / records.STATE_FILE]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} has no {missing[0]}")
    best = record.get("best") or {}
    metadata = {"method": record.get("method"), "method_resolved": record.get("method_resolved"),
                "best_epoch": best.get("epoch"), "peft_adapter": adapter_dir is not None,
                **{k: v for k, v in best.items() if k.startswith(("validation/", "test/"))}}
    artifact = wandb.Artifact(model_artifact_name(run_id), type="model", metadata=metadata,
                              description=f"{record.get('method')} run {run_dir.name}: trained state of its best epoch")
    for path in files:
        artifact.add_file(str(path), name=path.name)
    if adapter_dir is not None:
        artifact.add_dir(str(adapter_dir), name=Path(adapter_dir).name)
    return artifact
