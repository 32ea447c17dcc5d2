"""A `helm` command line over Helm 4's Go SDK (PyPI helm-python-sdk, .tools/helm-venv).

No registry reachable here ships the helm binary, and the project already tests its chart
with this engine (operator/tests/chart.rs). This is the subset of the CLI that make
node-up, make deploy and the e2e suite (upgrade scenario) use, with Helm 4's meaning:

  helm version
  helm install   RELEASE CHART [flags]
  helm upgrade   RELEASE CHART [--install] [--reuse-values|--reset-values] [flags]
      flags: -n/--namespace NS, --create-namespace, --set K=V, --set-string K=V,
             --set-json K=JSON, -f/--values FILE, --wait[=watcher|legacy|hookOnly],
             --timeout DURATION (default 5m0s), --rollback-on-failure (--atomic),
             --cleanup-on-fail, --description TEXT
  helm uninstall RELEASE [-n NS] [--wait[=...]] [--timeout D] [--ignore-not-found] [--keep-history]
  helm status    RELEASE [-n NS] [-o json]
  helm get values RELEASE [-n NS] [--all|-a] [-o json|yaml] [--revision N]
  helm list      [-n NS] [-A] [-a] [-o json]
  global: --kubeconfig PATH, --kube-context NAME (else $KUBECONFIG, ~/.kube/config)

`--wait` alone is Helm 4's `--wait=watcher` (kstatus: every resource current, a DaemonSet
with every pod updated and available); without it, Helm 4 waits for hooks only. `--set`
goes through Helm's own strvals parser (the SDK's), several merged in order as the CLI
does. YAML output is printed as JSON (JSON is YAML). Errors: `Error: ...`, exit 1.
"""

from __future__ import annotations

import datetime
import json
import re
import sys

import helm_python as helm

USAGE = __doc__.split("\n\n", 2)[2].split("\n\n")[0]


def die(msg: str) -> None:
    print(f"Error: {msg}", file=sys.stderr)
    sys.exit(1)


def duration(text: str) -> int:
    """A Go duration (`10m`, `1m30s`, `300s`, `1h`) in whole seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        die(f'invalid duration "{text}" (Go form, e.g. 10m, 90s, 1m30s)')
    return max(1, int(sum(float(n) * units[u] for n, u in parts)))


def deep_merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v
    return into


class Args:
    """Helm's flags, parsed the pflag way: `--flag value` or `--flag=value`, anywhere."""

    BOOL = {
        "--install", "--create-namespace", "--reuse-values", "--reset-values", "--all", "-a",
        "--all-namespaces", "-A", "--ignore-not-found", "--keep-history", "--debug",
        "--rollback-on-failure", "--atomic", "--cleanup-on-fail", "--short",
    }
    VALUE = {
        "-n", "--namespace", "--kubeconfig", "--kube-context", "--set", "--set-string",
        "--set-json", "-f", "--values", "--timeout", "-o", "--output", "--revision",
        "--description", "--version", "--max",
    }
    # Optional value, only as --flag=value (pflag NoOptDefVal).
    OPTIONAL = {"--wait": "watcher"}

    def __init__(self, argv: list[str]) -> None:
        self.positional: list[str] = []
        self.flags: dict[str, list[str]] = {}
        i = 0
        while i < len(argv):
            a = argv[i]
            i += 1
            if a == "--":
                self.positional += argv[i:]
                break
            if not a.startswith("-") or a == "-":
                self.positional.append(a)
                continue
            name, eq, value = a.partition("=")
            if name in self.OPTIONAL:
                self.flags.setdefault(name, []).append(value if eq else self.OPTIONAL[name])
            elif name in self.BOOL:
                if eq and value not in ("true", "false"):
                    die(f'invalid argument "{value}" for "{name}" flag')
                self.flags.setdefault(name, []).append(value if eq else "true")
            elif name in self.VALUE:
                if not eq:
                    if i >= len(argv):
                        die(f"flag needs an argument: {name}")
                    value = argv[i]
                    i += 1
                self.flags.setdefault(name, []).append(value)
            else:
                die(f"unknown flag: {name} (this helm is a subset over helm-python-sdk: "
                    "e2e/node/helm.py lists what it takes)")

    def get(self, *names: str, default: str | None = None) -> str | None:
        for n in names:
            if n in self.flags:
                return self.flags[n][-1]
        return default

    def all(self, *names: str) -> list[str]:
        return [v for n in names for v in self.flags.get(n, [])]

    def on(self, *names: str) -> bool:
        return any(self.get(n) == "true" for n in names)


def config(a: Args) -> helm.Config:
    return helm.Config(
        kubeconfig_path=a.get("--kubeconfig"),
        kube_context=a.get("--kube-context"),
        namespace=a.get("-n", "--namespace", default="default"),
    )


def values(a: Args) -> dict:
    """-f files first, then every --set* in the order given (as Helm's values.Options)."""
    out: dict = {}
    for path in a.all("-f", "--values"):
        try:
            with open(path) as f:
                deep_merge(out, helm.values_from_yaml(f.read()) or {})
        except OSError as e:
            die(f"reading values file {path}: {e}")
    parsers = {"--set": helm.parse_set_string, "--set-string": helm.parse_set_string_values,
               "--set-json": helm.parse_set_json}
    # The order across the three flags is the command line's.
    for name, expr in ordered_sets(a):
        deep_merge(out, parsers[name](expr))
    return out


def ordered_sets(a: Args) -> list[tuple[str, str]]:
    argv = sys.argv[2:]
    out = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ("--set", "--set-string", "--set-json"):
            if not eq:
                i += 1
                value = argv[i]
            out.append((name, value))
        i += 1
    return out


def wait_and_timeout(a: Args) -> tuple[str | None, int]:
    wait = a.get("--wait")
    if wait is not None and wait not in ("watcher", "legacy", "hookOnly"):
        die(f'invalid wait strategy "{wait}": watcher, legacy or hookOnly')
    return wait, duration(a.get("--timeout", default="5m0s"))


def deployed(rel: dict) -> str:
    for key in ("last_deployed", "lastDeployed", "first_deployed"):
        v = rel.get(key) or (rel.get("info") or {}).get(key)
        if v:
            return str(v)
    return datetime.datetime.now().astimezone().strftime("%a %b %e %H:%M:%S %Y")


def print_release(rel: dict, verb: str | None, name: str, namespace: str) -> None:
    if verb:
        print(f'Release "{name}" has been {verb}. Happy Helming!')
    print(f"NAME: {rel.get('name', name)}")
    print(f"LAST DEPLOYED: {deployed(rel)}")
    print(f"NAMESPACE: {rel.get('namespace', namespace)}")
    print(f"STATUS: {rel.get('status') or (rel.get('info') or {}).get('status')}")
    print(f"REVISION: {rel.get('revision') or rel.get('version')}")
    notes = rel.get("notes") or (rel.get("info") or {}).get("notes")
    if notes:
        print("NOTES:")
        print(notes.rstrip("\n"))


def release_exists(cfg: helm.Config, name: str) -> bool:
    try:
        cfg.history(name, max_revisions=1)
        return True
    except helm.HelmNotFoundError:
        return False


def cmd_install_or_upgrade(a: Args, upgrade: bool) -> None:
    if len(a.positional) != 2:
        die(f"{'upgrade' if upgrade else 'install'} takes RELEASE CHART")
    name, chart = a.positional
    ns = a.get("-n", "--namespace", default="default")
    wait, timeout = wait_and_timeout(a)
    vals = values(a)
    common = dict(namespace=ns, timeout=timeout, wait=wait,
                  rollback_on_failure=a.on("--rollback-on-failure", "--atomic"),
                  description=a.get("--description"))
    with config(a) as cfg:
        if upgrade and (not a.on("--install") or release_exists(cfg, name)):
            rel = cfg.upgrade(chart, name, vals, reuse_values=a.on("--reuse-values"),
                              reset_values=a.on("--reset-values"),
                              cleanup_on_fail=a.on("--cleanup-on-fail"), **common)
            print_release(rel, "upgraded", name, ns)
        else:
            if upgrade:
                print(f'Release "{name}" does not exist. Installing it now.')
            rel = cfg.install(chart, name, vals, create_namespace=a.on("--create-namespace"),
                              **common)
            print_release(rel, None, name, ns)


def cmd_uninstall(a: Args) -> None:
    if not a.positional:
        die("uninstall takes RELEASE...")
    wait, timeout = wait_and_timeout(a)
    with config(a) as cfg:
        for name in a.positional:
            cfg.uninstall(name, keep_history=a.on("--keep-history"), timeout=timeout,
                          ignore_not_found=a.on("--ignore-not-found"), wait=wait)
            print(f'release "{name}" uninstalled')


def output(a: Args, obj, text) -> None:
    fmt = a.get("-o", "--output", default="table")
    if fmt in ("json", "yaml"):
        print(json.dumps(obj, indent=None if fmt == "json" else 2))
    elif fmt == "table":
        text()
    else:
        die(f'invalid format "{fmt}": table, json or yaml')


def cmd_status(a: Args) -> None:
    if len(a.positional) != 1:
        die("status takes RELEASE")
    ns = a.get("-n", "--namespace", default="default")
    with config(a) as cfg:
        rel = cfg.status(a.positional[0])
    rel.pop("manifest", None)
    output(a, rel, lambda: print_release(rel, None, a.positional[0], ns))


def cmd_get(a: Args) -> None:
    if len(a.positional) != 2 or a.positional[0] != "values":
        die("only `get values RELEASE` is supported here")
    rev = a.get("--revision")
    with config(a) as cfg:
        vals = cfg.get_values(a.positional[1], all_values=a.on("--all", "-a"),
                              revision=int(rev) if rev else None)
    fmt = a.get("-o", "--output", default="yaml")
    if fmt == "json":
        print(json.dumps(vals))
    elif fmt in ("yaml", "table"):
        print("COMPUTED VALUES:" if a.on("--all", "-a") else "USER-SUPPLIED VALUES:")
        print(json.dumps(vals, indent=2))
    else:
        die(f'invalid format "{fmt}": json or yaml')


def cmd_list(a: Args) -> None:
    with config(a) as cfg:
        rels = cfg.list(all_states=a.on("--all", "-a"),
                        all_namespaces=a.on("--all-namespaces", "-A"))

    def table() -> None:
        print("NAME\tNAMESPACE\tREVISION\tUPDATED\tSTATUS\tCHART\tAPP VERSION")
        for r in rels:
            print("\t".join(str(r.get(k, "")) for k in
                            ("name", "namespace", "revision", "updated", "status", "chart",
                             "app_version")))

    output(a, rels, table)


def cmd_version(a: Args) -> None:
    sdk = helm.helm_sdk_version()
    if a.on("--short"):
        print(sdk)
    else:
        print(f'version.BuildInfo{{Version:"{sdk}", Engine:"helm-python-sdk {helm.__version__} '
              f'(Helm SDK {sdk})", CLI:"tidepool e2e/node/helm.py"}}')


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 1)
    cmd = sys.argv[1]
    a = Args(sys.argv[2:])
    try:
        if cmd == "install":
            cmd_install_or_upgrade(a, upgrade=False)
        elif cmd == "upgrade":
            cmd_install_or_upgrade(a, upgrade=True)
        elif cmd in ("uninstall", "delete", "del", "un"):
            cmd_uninstall(a)
        elif cmd == "status":
            cmd_status(a)
        elif cmd == "get":
            cmd_get(a)
        elif cmd in ("list", "ls"):
            cmd_list(a)
        elif cmd == "version":
            cmd_version(a)
        else:
            die(f'unknown command "{cmd}" for "helm" (this helm is a subset over '
                "helm-python-sdk: e2e/node/helm.py lists what it takes)")
    except helm.HelmError as e:
        die(str(e))


if __name__ == "__main__":
    main()
