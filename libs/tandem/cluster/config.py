"""Service configs: one typed dataclass per service, filled from a YAML file, the environment and flags.

Priority, lowest first: the dataclass defaults, the YAML file (`--config PATH`, keys are the field names),
environment variables `TANDEM_<SERVICE>_<FIELD>` (e.g. `TANDEM_CONTROLLER_PORT=50050`), then command-line
flags (`--<field-with-dashes>`). `add_config_flags` generates the flags from the dataclass fields, with the
help text from each field's `metadata["help"]`; `build_config` merges the sources and constructs the
dataclass once, so its `__post_init__` checks every value whatever its source. Supported field types: str,
int, float, bool and `X | None` of those (an empty value or `null` means None).

Nothing here reads the process environment by itself: `main` passes `os.environ` in.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A service setting Tandem cannot use; the message names the field and where the value came from."""


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (and allowed values), for `add_config_flags`."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def env_name(service: str, field_name: str) -> str:
    return f"TANDEM_{service}_{field_name}".upper().replace("-", "_")


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, whether None is allowed) of a field, resolving string annotations."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (str, int, float, bool):
            return rest[0], True
    if hint in (str, int, float, bool):
        return hint, False
    raise TypeError(f"{cls.__name__}.{f.name}: unsupported config field type {hint!r}")


def _convert(cls: type, f: dataclasses.Field, value: Any, source: str) -> Any:
    """Turn a YAML value or a string from the environment or a flag into the field's type."""
    kind, optional = _base_type(cls, f)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{f.name}: {source} gives no value, expected {kind.__name__}")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except ValueError:
        raise ConfigError(f"{f.name}: {value!r} from {source} is not a valid {kind.__name__}") from None


def add_config_flags(parser: argparse.ArgumentParser, cls: type, service: str) -> None:
    """Add `--config` and one flag per field of `cls`; unset flags stay out of the namespace."""
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help=f"YAML file of settings (keys are the field names: {dataclasses.fields(cls)[0].name}, "
                             f"...); environment variables {env_name(service, '<FIELD>')} override it, flags "
                             "override both")
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(cls, f)
        text = f.metadata.get("help", "")
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        help_text = f"{text} ({default}; env {env_name(service, f.name)})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        # converted later by _convert, so a bad flag names the field in the same way as a bad YAML value
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else kind.__name__.upper()
        parser.add_argument(_flag(f.name), metavar=metavar, **kwargs)


def build_config(cls: type[T], service: str, args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None, yaml_path: str | Path | None = None) -> T:
    """Build `cls` from defaults < YAML < environment < flags; ConfigError names the field of a bad value.

    `yaml_path` defaults to `args.config`; `environ` is the environment to read (None: none).
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    yaml_path = yaml_path if yaml_path is not None else getattr(args, "config", None)
    if yaml_path is not None:
        for key, value in _read_yaml(Path(yaml_path)).items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise ConfigError(f"{yaml_path}: unknown setting {key!r} (known: {', '.join(names)})")
            values[key] = _convert(cls, names[key], value, f"{yaml_path}")
    prefix = env_name(service, "")
    for key, value in (environ or {}).items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].lower()
        if name not in names:
            raise ConfigError(f"{key}: unknown setting {name!r} for {service} (known: {', '.join(names)})")
        values[name] = _convert(cls, names[name], value, key)
    for name, f in names.items():
        if args is not None and hasattr(args, name):
            values[name] = _convert(cls, f, getattr(args, name), _flag(name))
    missing = [n for n, f in names.items()
               if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("; ".join(f"{n} is required ({_flag(n)}, {env_name(service, n)} or {n!r} in the YAML)"
                                    for n in missing))
    for name, value in values.items():
        choices = names[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return cls(**values)


def _redact_url(url: str) -> str:
    """`url` with the password of its user-info part replaced by *** (URLs go into logs and errors)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, host = netloc.rsplit("@", 1)
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}{slash}{path}"


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value, got {type(raw).__name__}")
    return raw


@dataclasses.dataclass(slots=True, frozen=True)
class ControllerConfig:
    """The controller: membership, the data-plane rendezvous and the expert placement of one deployment."""

    model_dir: str = setting(help="Hugging Face-layout checkpoint directory; its config.json gives the MoE "
                                  "layers and experts the placement covers")
    host: str = setting("0.0.0.0", help="address the gRPC server binds")
    port: int = setting(50050, help="gRPC port (0 = any free port)")
    # data plane
    store_host: str = setting("127.0.0.1", help="host announced to members for the data-plane TCPStore "
                                                "(the store itself listens on every interface)")
    store_port: int = setting(29500, help="port of the data-plane TCPStore (0 = any free port)")
    backend: str = setting("gloo", help="data-plane backend: gloo on CPUs, nccl on GPUs", choices=("gloo", "nccl"))
    # the deployment's fixed shape
    num_prefill: int = setting(1, help="prefill workers (data-plane ranks 0 .. num_prefill-1)")
    num_decode: int = setting(1, help="decode workers (ranks after the prefill workers)")
    num_expert_servers: int = setting(2, help="expert servers (ranks after every attention worker)")
    num_slots_per_server: int = setting(0, help="physical expert slots per expert server (0 = just enough to "
                                                "hold each logical expert once)")
    num_gateways: int = setting(1, help="gateways that may register (0 = any number)")
    # liveness
    heartbeat_interval_s: float = setting(1.0, help="how often members are told to heartbeat, in seconds")
    heartbeat_timeout_s: float = setting(3.0, help="a member whose last heartbeat is older than this is down")
    placement_history: int = setting(16, help="placement versions kept for GetPlacement")
    grace_s: float = setting(5.0, help="seconds in-flight calls get to finish at shutdown")
    metrics_port: int = setting(0, help="Prometheus metrics HTTP port (0 = off)")
    # discovery
    discovery: str = setting("static", help="how the controller learns the pools' pods: static (members register "
                                            "and heartbeat; make up, docker-compose) or kubernetes (also list and "
                                            "watch the pods through the Kubernetes API and mark a deleted pod's "
                                            "members down at once)", choices=("static", "kubernetes"))
    namespace: str = setting("", help="with --discovery kubernetes: the pods' namespace (empty: this pod's own)")
    pod_selector: str = setting("app.kubernetes.io/name=tandem", help="with --discovery kubernetes: label "
                                "selector of the deployment's pods, e.g. app.kubernetes.io/instance=RELEASE")
    role_label: str = setting("app.kubernetes.io/component", help="with --discovery kubernetes: the pod label "
                              "whose value names the pool (prefill, decode or expert)")
    kubeconfig: str = setting("", help="with --discovery kubernetes: kubeconfig file of the cluster (empty: the "
                                       "in-cluster service account)")
    # expert load balancing (tandem.eplb.rebalancer)
    redis_url: str = setting("", help="Redis holding the expert servers' load statistics, the same URL as theirs, "
                                      "e.g. redis://127.0.0.1:6379/0 (empty: expert load balancing off, and the "
                                      "Rebalance RPC answers FAILED_PRECONDITION)")
    stats_model_name: str = setting("", help="model name in the statistics' Redis keys (empty: the model "
                                             "directory's name, which the expert servers use by default)")
    rebalance_interval_s: float = setting(0.0, help="re-plan the expert placement from the statistics every this "
                                                    "many seconds (0 = only on demand: the Rebalance RPC, `tandem "
                                                    "eplb rebalance`)")
    rebalance_min_gain: float = setting(0.01, help="apply a re-plan only if it raises the mean balancedness (mean "
                                                   "/ max expert-server load, averaged over MoE layers) by more "
                                                   "than this, in [0, 1)")
    rebalance_margin: float = setting(0.0, help="keep an expert where it is unless moving it lowers the most "
                                                "loaded server's load by more than this fraction (once for "
                                                "each expert a change moves), in [0, 1)")
    rebalance_windows: int = setting(6, help="newest statistics windows (of the expert servers' "
                                             "stats_window_s) a re-plan reads")
    rebalance_decay: float = setting(0.8, help="weight of a statistics window relative to the next newer one, in "
                                               "(0, 1] (1 = plain sum)")
    eplb_policy: str = setting("auto", help="placement policy: hierarchical (expert groups to nodes, replicas "
                                            "inside a node), global (replicas anywhere) or auto (hierarchical when "
                                            "the model's n_group is a multiple of num_nodes)",
                               choices=("auto", "global", "hierarchical"))
    num_nodes: int = setting(1, help="nodes the expert servers are spread over evenly, for the hierarchical "
                                     "policy; with more than 1 each expert server registers its node, and a "
                                     "node's servers get one block of indices (server i on node "
                                     "i // (num_expert_servers / num_nodes))")
    stage_timeout_s: float = setting(120.0, help="how long every expert server may take to load the experts of "
                                                 "a new placement beside the serving ones")
    ack_timeout_s: float = setting(30.0, help="how long a re-plan waits for every prefill and decode worker to "
                                              "switch to the new placement, then frees the old copies (if some "
                                              "have not switched by then, a later re-plan frees them)")

    def __post_init__(self) -> None:
        if self.discovery not in ("static", "kubernetes"):
            raise ConfigError(f"discovery: {self.discovery!r} is not one of static, kubernetes")
        if self.discovery == "kubernetes" and not self.role_label:
            raise ConfigError("role_label: empty, but --discovery kubernetes tells the pools apart by it")
        for name in ("port", "store_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: {getattr(self, name)} is not a port number (0 .. 65535)")
        if self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"backend: {self.backend!r} is not one of gloo, nccl")
        if self.num_prefill + self.num_decode < 1:
            raise ConfigError(f"num_prefill + num_decode: need at least one attention worker, got "
                              f"{self.num_prefill} + {self.num_decode}")
        for name in ("num_prefill", "num_decode", "num_expert_servers", "num_slots_per_server", "num_gateways"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)} is negative")
        if self.heartbeat_interval_s <= 0:
            raise ConfigError(f"heartbeat_interval_s: {self.heartbeat_interval_s} must be positive")
        if self.heartbeat_timeout_s < self.heartbeat_interval_s:
            raise ConfigError(f"heartbeat_timeout_s: {self.heartbeat_timeout_s} is shorter than "
                              f"heartbeat_interval_s={self.heartbeat_interval_s}")
        if self.placement_history < 1:
            raise ConfigError(f"placement_history: {self.placement_history} must be at least 1")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s: {self.grace_s} is negative")
        if not self.model_dir:
            raise ConfigError("model_dir: empty")
        self._check_load_balancing()

    def _check_load_balancing(self) -> None:
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url: {_redact_url(self.redis_url)!r} is not a redis://, rediss:// or "
                              "unix:// URL")
        if self.rebalance_interval_s < 0:
            raise ConfigError(f"rebalance_interval_s: {self.rebalance_interval_s} is negative (0 = only on demand)")
        if self.rebalance_interval_s > 0 and not self.redis_url:
            raise ConfigError(f"rebalance_interval_s: {self.rebalance_interval_s}, but redis_url is empty: the "
                              "re-plans need the expert servers' statistics in Redis")
        for name in ("rebalance_min_gain", "rebalance_margin"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} is not in [0, 1)")
        if self.rebalance_windows < 1:
            raise ConfigError(f"rebalance_windows: {self.rebalance_windows} must be at least 1")
        if not 0 < self.rebalance_decay <= 1:
            raise ConfigError(f"rebalance_decay: {self.rebalance_decay} is not in (0, 1]")
        if self.eplb_policy not in ("auto", "global", "hierarchical"):
            raise ConfigError(f"eplb_policy: {self.eplb_policy!r} is not one of auto, global, hierarchical")
        if self.num_nodes < 1:
            raise ConfigError(f"num_nodes: {self.num_nodes} must be at least 1")
        if self.num_expert_servers % self.num_nodes:
            raise ConfigError(f"num_nodes: {self.num_expert_servers} expert servers cannot be spread evenly over "
                              f"{self.num_nodes} nodes (num_expert_servers must be a multiple of num_nodes)")
        if self.stage_timeout_s <= 0:
            raise ConfigError(f"stage_timeout_s: {self.stage_timeout_s} must be positive")
        if self.ack_timeout_s < 0:
            raise ConfigError(f"ack_timeout_s: {self.ack_timeout_s} is negative")

    @property
    def redis_url_redacted(self) -> str:
        """`redis_url` with its password replaced by ***, for logs."""
        return _redact_url(self.redis_url)

    @property
    def world_size(self) -> int:
        """Ranks of the data plane: every prefill, decode and expert server of the fixed shape."""
        return self.num_prefill + self.num_decode + self.num_expert_servers
