"""``beamlens``: the one command-line entry point.

- ``beamlens run --config FILE``: run the daemon until SIGINT/SIGTERM.
- ``beamlens demo [--config FILE]``: proxy + daemon + simulated beamline on 127.0.0.1.
- ``beamlens check-config FILE``: validate a config and exit (0 valid, 2 invalid), naming the YAML
  path of every bad field.
- ``beamlens schema``: print the config's JSON schema (generated from the pydantic models).
- ``beamlens simulate-detector --format dectris-v2 ...``: an emulated detector sending synthetic
  frame series (DECTRIS stream v1/v2, Jungfraujoch, array-1.0, pyzmq send_array) on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config

log = logging.getLogger("beamlens")


def default_demo_config() -> Path:
    """``configs/demo.yaml``, installed as package data of the ``beamlens.configs`` namespace package.

    Looked up on the namespace's search path rather than with ``importlib.resources.files``, which
    raises on the placeholder entry setuptools' editable finder adds to a namespace path (Python 3.11).

    Raises:
        FileNotFoundError: the installation lacks it (a broken wheel).
    """
    spec = importlib.util.find_spec("beamlens.configs")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "demo.yaml"
        if path.is_file():
            return path
    raise FileNotFoundError("beamlens.configs/demo.yaml is not installed; reinstall beamlens")


def _load(path: str | Path, warn: bool = True) -> Config:
    try:
        config = load_config(path, warn=warn)
        from .metric_trends import check_metric_names
        check_metric_names(config, source=str(path))  # trends series of daemon metrics name metrics the daemon exports
        return config
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamlens", description="Live analysis of Bluesky documents and detector frames.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon")
    p_run.add_argument("--config", required=True, help="YAML config file")
    p_demo = sub.add_parser("demo", help="run the daemon on the embedded simulated beamline")
    p_demo.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    p_demo.add_argument("--no-serve", action="store_true", help="exit after the demo runs instead of serving")
    p_demo.add_argument("--stxm-points", type=int, default=150, help="replay an N x N corner of the STXM image")
    p_check = sub.add_parser("check-config", help="validate a config file")
    p_check.add_argument("file")
    sub.add_parser("schema", help="print the config JSON schema")
    p_sim = sub.add_parser("simulate-detector", help="send synthetic frame series like a detector")
    p_sim.add_argument("--format", required=True, choices=["dectris-v1", "dectris-v2", "jungfraujoch", "array-1.0", "send-array"])
    p_sim.add_argument("--address", default=None, help="0MQ address (default tcp://127.0.0.1:<format's port>)")
    p_sim.add_argument("--socket", choices=["push", "pub"], default="push")
    p_sim.add_argument("--connect", action="store_true", help="connect instead of binding")
    p_sim.add_argument("--frames", type=int, default=100, help="frames per series")
    p_sim.add_argument("--series", type=int, default=1, help="number of series to send")
    p_sim.add_argument("--shape", type=int, nargs=2, default=(256, 256), metavar=("ROWS", "COLS"))
    p_sim.add_argument("--dtype", choices=["uint8", "uint16", "uint32"], default="uint16")
    p_sim.add_argument("--compression", default=None,
                       help="v1: <, lz4<, bslz4 (default); v2: none, bslz4 (default), lz4, bszstd")
    p_sim.add_argument("--rate", type=float, default=100.0, help="frames per second (0: as fast as possible)")
    p_sim.add_argument("--run-uid", default=None, help="Bluesky run uid to put in the series header")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        config = _load(args.file, warn=False)
        print(f"{args.file}: valid ({len(config.sources.bluesky)} bluesky source(s), {len(config.sources.kafka)} kafka source(s), "
              f"{len(config.sources.frames)} frame source(s), {len(config.consumers)} consumer(s))")
        if config.ignored_environment:
            print("warning: environment variables with the BEAMLENS_ prefix that name no config field, not applied: "
                  + ", ".join(config.ignored_environment), file=sys.stderr)
        return 0
    if args.command == "schema":
        print(json.dumps(Config.model_json_schema(by_alias=True), indent=2))
        return 0
    if args.command == "run":
        config = _load(args.config)
        _logging(config.log_level)
        from .app import Daemon
        return Daemon(config).run_until_signalled()
    if args.command == "simulate-detector":
        _logging("INFO")
        from .sim.detectors import simulate_detector
        simulate_detector(args.format, address=args.address, socket_type=args.socket, bind=not args.connect,
                          n_frames=args.frames, n_series=args.series, shape=tuple(args.shape), dtype=args.dtype,
                          compression=args.compression, rate_hz=args.rate or None, run_uid=args.run_uid)
        return 0
    if args.command == "demo":
        config = _load(args.config or default_demo_config())
        _logging(config.log_level)
        from .sim.demo import run_demo
        n = args.stxm_points
        region = None if n >= 150 else (slice(0, n), slice(0, n))
        run_demo(config, stxm_region=region, serve=not args.no_serve)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
