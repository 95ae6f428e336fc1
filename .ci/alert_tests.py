#!/usr/bin/env python3
"""Every alert of the rules file has unit tests that show it firing and staying silent.

`promtool test rules` only checks the expectations a test file states: an alert nobody wrote
a test for passes, and so does a test of an alert name that does not exist (its expected
"no alert" is trivially met). This script reads the rules file and the test files and fails
unless, for every alert of the rules file, the tests contain
  * a case where it fires (an `alert_rule_test` item with a non-empty `exp_alerts`), and
  * a case where it stays silent (an item with `exp_alerts: []`),
and every `alertname` of the tests names an alert of the rules file.

The files are read line by line (no YAML library): alerts are `- alert: Name` lines, test
cases are `alertname: Name` lines followed, within the same item, by `exp_alerts: []` (silent)
or by `exp_alerts:` and a list item (fires). That is the layout of the files in
ops/prometheus; anything else is reported as unrecognised rather than guessed at.

Run:  python3 .ci/alert_tests.py [--rules FILE] [--tests GLOB] [--self-test]
"""
from __future__ import annotations

import argparse, glob, re, sys
from pathlib import Path

ALERT_RE = re.compile(r"^\s*-\s+alert:\s*['\"]?([A-Za-z_:][\w:]*)['\"]?\s*(#.*)?$")
ALERTNAME_RE = re.compile(r"^(\s*)(?:-\s+)?alertname:\s*['\"]?([A-Za-z_:][\w:]*)['\"]?\s*(#.*)?$")
EXP_RE = re.compile(r"^\s*exp_alerts:\s*(.*?)\s*(#.*)?$")
ITEM_START_RE = re.compile(r"^\s*-\s")


def alerts_of(rules: str) -> list[str]:
    return [m.group(1) for line in rules.splitlines() if (m := ALERT_RE.match(line))]


def cases_of(tests: str, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(alert, "fires" | "silent") per test case, and the problems found."""
    lines = tests.splitlines()
    cases, problems = [], []
    for i, line in enumerate(lines):
        m = ALERTNAME_RE.match(line)
        if not m:
            continue
        name, kind = m.group(2), None
        # The rest of this item: up to the next line that starts an item at most as indented.
        indent = len(m.group(1))
        for j in range(i + 1, len(lines)):
            nxt = lines[j]
            if not nxt.strip() or nxt.lstrip().startswith("#"):
                continue
            depth = len(nxt) - len(nxt.lstrip())
            if depth < indent or (ITEM_START_RE.match(nxt) and depth <= indent):
                break
            e = EXP_RE.match(nxt)
            if not e:
                continue
            value = e.group(1)
            if value == "[]":
                kind = "silent"
            elif value == "":
                following = next(
                    (l for l in lines[j + 1:] if l.strip() and not l.lstrip().startswith("#")), ""
                )
                # A block sequence may sit at the key's own indentation or deeper.
                if ITEM_START_RE.match(following) and len(following) - len(following.lstrip()) >= depth:
                    kind = "fires"
            break
        if kind is None:
            problems.append(f"{where}:{i + 1}: test of {name} without a recognised exp_alerts")
        else:
            cases.append((name, kind))
    return cases, problems


def check(rules: str, tests: dict[str, str]) -> list[str]:
    alerts = alerts_of(rules)
    problems = []
    if not alerts:
        problems.append("no `- alert:` line in the rules file")
    seen: dict[str, set[str]] = {a: set() for a in alerts}
    for where, text in tests.items():
        cases, found = cases_of(text, where)
        problems += found
        for name, kind in cases:
            if name not in seen:
                problems.append(f"{where}: tests alert {name}, which the rules file does not define")
            else:
                seen[name].add(kind)
    for a in alerts:
        for kind in ("fires", "silent"):
            if kind not in seen[a]:
                problems.append(f"alert {a} has no test case where it {'fires' if kind == 'fires' else 'stays silent'}")
    return problems


def self_test() -> int:
    rules = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: x > 1\n      - alert: B\n        expr: y > 1\n"
    good = """tests:
  - interval: 1m
    alert_rule_test:
      - eval_time: 1m
        alertname: A
        exp_alerts: []
      - eval_time: 2m
        alertname: A
        exp_alerts:
          - exp_labels:
              severity: page
      - eval_time: 1m
        alertname: B
        exp_alerts:
          - exp_labels: {}
      - alertname: B
        eval_time: 3m
        exp_alerts: []
"""
    assert check(rules, {"good": good}) == [], check(rules, {"good": good})
    only_silent = good.replace("""        exp_alerts:
          - exp_labels: {}
""", """        exp_alerts: []
""")
    assert check(rules, {"t": only_silent}) == ["alert B has no test case where it fires"], check(rules, {"t": only_silent})
    unknown = good + """      - eval_time: 1m
        alertname: C
        exp_alerts: []
"""
    assert check(rules, {"t": unknown}) == ["t: tests alert C, which the rules file does not define"]
    missing = good.replace("alertname: A\n        exp_alerts: []", "alertname: A\n        exp_alertz: []")
    assert "t:5: test of A without a recognised exp_alerts" in check(rules, {"t": missing}), check(rules, {"t": missing})
    assert check(rules, {}) == [
        "alert A has no test case where it fires", "alert A has no test case where it stays silent",
        "alert B has no test case where it fires", "alert B has no test case where it stays silent",
    ]
    print("alert_tests: self-test passed")
    return 0


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default=str(root / "ops/prometheus/tracktrace-alerts.yml"))
    ap.add_argument("--tests", default=str(root / "ops/prometheus/tests/*.yml"))
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    files = sorted(glob.glob(args.tests))
    if not files:
        print(f"alert_tests: no test files match {args.tests}", file=sys.stderr)
        return 1
    tests = {f: Path(f).read_text() for f in files}
    problems = check(Path(args.rules).read_text(), tests)
    for p in problems:
        print(f"alert_tests: {p}", file=sys.stderr)
    if problems:
        return 1
    n = len(alerts_of(Path(args.rules).read_text()))
    print(f"alert_tests: each of the {n} alerts fires and stays silent in {len(files)} test files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
