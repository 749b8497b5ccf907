"""The incident replay's table (loadtest/incident.sh): one row per proxy from the reports the
driver printed with --json, one JSON object per line. In SMOKE mode it also checks the targets
loosely and exits 3 when one is missed.

    python3 loadtest/incident_table.py REPORTS.jsonl SMOKE(0|1)
    python3 loadtest/incident_table.py --describe FAILURE
"""
import json
import sys

DESCRIBE = {
    "slow": "Backend 2 turns slow after the first phase: +500 ms a call, 16 workers, and work that outlives its caller.",
    "fail-fast": "Backend 2 answers every call UNAVAILABLE at once after the first phase, as with a broken dependency.",
    "hang": "Backend 2 stops after the first phase: its connections freeze (nothing read or written, PINGs unanswered) while TCP connects still succeed. It counts no calls, so its share is the calls that did not reach b1.",
    "overload": "Backend 2's capacity drops after the first phase to 4 workers of 51 ms a call (about 78 calls/s, below its half of the rate); calls beyond them queue.",
}


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "--describe":
        print(DESCRIBE[sys.argv[2]])
        return 0
    lines = [json.loads(line) for line in open(sys.argv[1])]
    smoke = sys.argv[2] == "1"
    print("| proxy | b1 / b2 share before | b1 / b2 share after | p50 after ms | p99 after ms | errors after | failing backend: calls started past deadline | failing backend: peak concurrency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = []
    for line in lines:
        name, r = line["name"], line["report"]
        sb, sa, a = r["share_before"], r["share_after"], r["after"]
        errors = ", ".join(f"{k} {v}" for k, v in a["codes"].items() if k != "OK") or "0"
        total = f" of {a['calls']}"
        print(f"| {name} | {sb['b1']:.0%} / {sb['b2']:.0%} | {sa['b1']:.0%} / {sa['b2']:.0%} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {errors}{total} | {r['started_past_deadline']} | {r['slow_max_in_flight']} |")
        if smoke:
            if sa["b2"] > 0.2:
                failed.append(f"{r['failure']}: failing backend share after {sa['b2']:.0%}")
            if r["started_past_deadline"] != 0:
                failed.append(f"{r['failure']}: calls started past their deadline")
            if a["errors"] > a["calls"] * 0.05:
                failed.append(f"{r['failure']}: {a['errors']} errors of {a['calls']}")
    if failed:
        print("SMOKE FAILED: " + "; ".join(failed), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
