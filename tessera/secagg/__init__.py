"""Secure aggregation: the server learns only the sum of the clients' updates.

- SecAgg+ (`SecAggPlus`): fixed-point quantisation in Z_{2^k}, X25519-agreed pairwise masks and a self mask
  expanded by a cryptographic PRG, Shamir-shared secrets over a sparse neighbour graph; survives dropouts after
  masking; holds against a malicious coordinator (signed keys, a consistency round; see `pki`).
- CKKS (`CKKS`): homomorphic summation with TenSEAL; clients share a per-round secret key, the server holds only
  the public context. Different trust model (see docs/secure-aggregation.md).

`plugin(spec)` turns "secagg+" | "ckks" | a `[secagg]` dict | an object into a job plugin; `simulate_round` runs
the whole SecAgg+ protocol among in-process parties.
"""

from tessera.secagg.ckks import CKKS
from tessera.secagg.messages import Stage
from tessera.secagg.pki import CertPKI, PartyKeys, SimulatedPKI
from tessera.secagg.plugin import plugin
from tessera.secagg.plus import SecAggMod, SecAggPlus, SecAggPlusAggregation
from tessera.secagg.simulate import RoundReport, run_round, simulate_round

__all__ = ["CKKS", "CertPKI", "PartyKeys", "RoundReport", "SecAggMod", "SecAggPlus", "SecAggPlusAggregation",
           "SimulatedPKI", "Stage", "plugin", "run_round", "simulate_round"]
