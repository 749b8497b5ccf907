"""The overload replay's table (loadtest/incident.sh --failure overload-all): one row per
scenario and proxy, from the reports `sluice-loadtest overload --json` printed, one JSON object
per line. In SMOKE mode it also checks sluice's default config loosely and exits 3 when it
misses.

    python3 loadtest/overload_table.py REPORTS.jsonl SMOKE(0|1)
"""
import json
import sys

SCENARIOS = {
    "2x": "3 backends x 2 workers x 25 ms (240 calls/s), 2x capacity offered, then half the capacity for 3 s",
    "4x": "the same, 4x capacity offered",
    "unequal": "backends of 1, 2 and 4 workers (280 calls/s), 2x capacity offered",
    "context": "2x capacity, backends that drop a call whose caller has gone",
    "heavy-client": "2x capacity from 4 clients on their own IPs: one sends 10x each other's rate",
}


def extra(r):
    """The scenario's own figure: recovery, or the light clients' success."""
    if r.get("relief_success") is not None:
        return f"{r['relief_success']:.1%} OK at half capacity"
    clients = r.get("clients") or []
    if clients:
        light = [c for c in clients if c["name"] != "heavy"]
        heavy = [c for c in clients if c["name"] == "heavy"]
        worst = min(c["success"] for c in light)
        return f"light clients >= {worst:.1%} OK, heavy {heavy[0]['success']:.1%}"
    return ""


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    lines = [json.loads(line) for line in open(sys.argv[1])]
    smoke = sys.argv[2] == "1"
    print("| scenario | proxy | goodput, % of capacity | work started after its deadline | OK p99 ms | errors | also |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = []
    for line in lines:
        name, scenario, r = line["name"], line["scenario"], line["report"]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()) if k != "OK") or "0"
        print(
            f"| {scenario} | {name} | {r['goodput_share']:.0%} | {r['wasted_share']:.1%} "
            f"({r['work_started_late']} of {r['work_started']}) | {r['ok_p99_ms']:.0f} | {errors} | {extra(r)} |"
        )
        if smoke and name == "sluice-default":
            if r["goodput_share"] < 0.5:
                failed.append(f"{scenario}: goodput {r['goodput_share']:.0%} of capacity")
            if r["wasted_share"] > 0.1:
                failed.append(f"{scenario}: {r['wasted_share']:.0%} of the work wasted")
    print()
    for scenario, text in SCENARIOS.items():
        if any(line["scenario"] == scenario for line in lines):
            print(f"- {scenario}: {text}.")
    if failed:
        print("SMOKE FAILED: " + "; ".join(failed), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
