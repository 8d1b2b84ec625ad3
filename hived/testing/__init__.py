"""Helpers for testing and benchmarking hived, shared by tests/ and benchmarks/.

* `hived.testing.netns`: real test hosts (`TestNet`, `Host`), each a Linux
  network namespace on one bridge, with faults (cuts, partitions, drops,
  loss, bandwidth caps); `netns_owners` names, sweeps and tears down
  their resources, `netns_plumbing` runs `ip` and `tc` and joins namespaces.
* `hived.testing.meshnet`: a `Cluster` of real daemons, one per test host.
* `hived.testing.simnet`: `SimNet`, the simulated network that drives the
  daemon's sans-IO mesh cores on a manual clock.
* `hived.testing.campaign`: the fault campaign (a seeded nemesis against a
  `Cluster`, two clients mapping throughout, a checker), with its client
  process `hived.testing.campaign_client`.
* `hived.testing.childenv`: the environment a subprocess needs to run this
  hived; `hived.testing.waiting`: `wait_for`, polling with a deadline;
  `hived.testing.embedded`: a call run on an embedded hive's node loop.

The network-namespace parts (netns, meshnet, campaign) need root and
iproute2 (`ip`, `tc`) on Linux; `netns.netns_available()` says whether this
process can build a TestNet, and why not. Nothing here imports pytest or
hypothesis: the fixtures and strategies built on these helpers live in tests/.
"""
