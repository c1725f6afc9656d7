#!/usr/bin/env python3
"""Splits a shard's memory into what a served source costs beyond its
connections and what one open connection costs, from two results of
bench/scale.sh at different CONNS (the warm-up keeps every source at its
full count, so one run cannot tell them apart):

    CONNS=1 SCALE_CHANGES=0 bench/scale.sh      # writes bench/results/scale-A.txt
    bench/scale.sh                              # CONNS=12: scale-B.txt
    bench/memsplit.py bench/results/scale-A.txt bench/results/scale-B.txt

Each run gives, per shard, RSS growth per served source with its CONNS
connections (P = s + CONNS * c). Averaged over the shards of each run,
the two runs give c = (P_b - P_a) / (CONNS_b - CONNS_a) and s = P_a -
CONNS_a * c; the range over every pairing of one shard of each run is
printed too.
"""
import re
import sys


def read(path):
    text = open(path, encoding="utf-8").read()
    m = re.search(r"^# N=\d+ CONNS=(\d+)", text, re.M)
    if not m:
        sys.exit(f"{path}: no '# N=... CONNS=...' header line")
    per = [float(x) for x in re.findall(r"([\d.]+) KiB per source with its connections", text)]
    if not per:
        sys.exit(f"{path}: no 'KiB per source with its connections' figures")
    return int(m.group(1)), per


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    (ka, pa), (kb, pb) = read(sys.argv[1]), read(sys.argv[2])
    if ka == kb:
        sys.exit(f"both runs have CONNS={ka}; need two different counts")
    if ka > kb:
        (ka, pa), (kb, pb) = (kb, pb), (ka, pa)
    mean_a, mean_b = sum(pa) / len(pa), sum(pb) / len(pb)
    c = (mean_b - mean_a) / (kb - ka)
    s = mean_a - ka * c
    pairs = [((b - a) / (kb - ka), a - ka * (b - a) / (kb - ka)) for a in pa for b in pb]
    print(f"CONNS={ka}: {min(pa):.1f}-{max(pa):.1f} KiB per source with its connections ({len(pa)} shards)")
    print(f"CONNS={kb}: {min(pb):.1f}-{max(pb):.1f} KiB per source with its connections ({len(pb)} shards)")
    print(f"per open connection: {c:.1f} KiB (shard pairings {min(p[0] for p in pairs):.1f}-{max(p[0] for p in pairs):.1f}; target under 24)")
    print(f"per served source beyond its connections: {s:.1f} KiB (shard pairings {min(p[1] for p in pairs):.1f}-{max(p[1] for p in pairs):.1f}; target under 40)")


if __name__ == "__main__":
    main()
