"""Several nodes, one command: `rose-pl run` started once per node by the cluster's launcher.

The launchers are those Lightning and torch know: `srun` under SLURM (one task per node), `torchrun --nnodes N
--nproc_per_node 1`, or plain environment variables (`MASTER_ADDR`, `MASTER_PORT`, `NODE_RANK`) on each node.
`detect_cluster` reads them the way Lightning's cluster environments do. The `run` processes (one per node) then
talk through torch.distributed's TCPStore at `MASTER_ADDR:MASTER_PORT` (hosted by node 0, or torchrun's own agent
store), nothing home-made:

- node 0 coordinates: it holds the run folder's lock, checks the inputs, plans the stages and alone writes the
  bookkeeping. Stages that need every device of every node (training, the pool's gradient passes) are published
  as steps; each node then starts the same `rose-pl fit|predict --config <run>/configs/<stage>.yaml` with
  `NODE_RANK`, `MASTER_ADDR` and a fresh `MASTER_PORT`, and Lightning's launcher starts the node's ranks. The few
  validation pairs run on one device of node 0; scoring, selection, reports and the comparison run once, on node 0.
- the other nodes follow the steps in order, and wait at clear points: for the next step, and for every node's
  result at the end of one.
- at start every node proves it sees the same output folder (a token file node 0 writes), the same input files and
  the model; every node sends a heartbeat. A node that fails, or stops beating for `trainer.node_timeout` seconds,
  makes the others stop with a message naming the node and the stage. A rerun of the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from rose_pl.errors import ConfigError, RoseError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_NAME", "ROLE_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")
SHARED_CHECK = ".shared-storage-check"
STAGE_PARENT_ENV = "ROSE_PL_STAGE_PARENT"
"""Set in a stage subprocess's environment to the pid of the `run` process that started it."""


class NodeFailedError(RoseError):
    """Another node failed, stopped responding, or disagrees about the run (the message says which and where)."""


def stage_env(master: tuple[str, int] | None = None, node_rank: int = 0) -> dict[str, str]:
    """The environment of a Lightning stage subprocess: the cluster launcher's variables removed (else Lightning
    would think the launcher started the stage's ranks and start none), then MASTER_ADDR/MASTER_PORT/NODE_RANK of
    the stage's own process group when it spans nodes."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    if master is not None:
        env.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), NODE_RANK=str(node_rank))
    env[STAGE_PARENT_ENV] = str(os.getpid())
    return env


def die_with_parent() -> None:
    """In a stage subprocess (Linux): be killed when the process that started it dies, even by SIGKILL or the OOM
    killer. Else the stage would go on writing into a run folder whose lock died with `run`, beside the rerun that
    then takes the lock. A killed stage resumes from its written rows like any other. Ranks that Lightning starts
    from the stage inherit this and die with the stage's first rank."""
    parent = os.environ.get(STAGE_PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # The run may have died before prctl: the first rank's parent is then no longer `run` (Lightning's own ranks,
    # started by the first rank, carry LOCAL_RANK and another parent).
    if "LOCAL_RANK" not in os.environ and os.getppid() != int(parent):
        raise SystemExit(f"rose-pl: the run process {parent} that started this stage is gone")


@dataclass(frozen=True)
class Cluster:
    """Where this `run` process sits: its node, how many nodes, and the coordination address."""

    node_rank: int
    num_nodes: int
    address: str
    port: int
    launcher: str
    agent_store: bool = False
    """torchrun hosts a store on MASTER_PORT itself: every node connects to it as a client."""


def detect_cluster(num_nodes: int) -> Cluster | None:
    """The cluster this process was started in, for a run over `num_nodes` nodes (None for one node)."""
    if num_nodes == 1:
        return None
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID"):  # torchrun (Lightning's TorchElasticEnvironment.detect)
        local = int(env.get("LOCAL_WORLD_SIZE", "1"))
        if local != 1:
            raise ConfigError(f"torchrun started {local} processes per node; start one `rose-pl run` per node "
                              "(torchrun --nproc_per_node 1): it launches the node's device ranks itself")
        cluster = Cluster(int(env["RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                          "torchrun", env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    else:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():
            tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", env["SLURM_NTASKS"]))
            if tasks != nodes:
                raise ConfigError(f"srun started {tasks} tasks on {nodes} nodes; start one `rose-pl run` per node "
                                  "(srun --ntasks-per-node=1): it launches the node's device ranks itself")
            address, port = _slurm_address()
            cluster = Cluster(int(env["SLURM_PROCID"]), tasks, address, port, "srun")
        else:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
            if "NODE_RANK" not in env and "GROUP_RANK" not in env:
                missing.append("NODE_RANK")
            if missing:
                raise ConfigError(
                    f"trainer.num_nodes is {num_nodes}: start `rose-pl run` once per node under srun "
                    "(--ntasks-per-node=1) or torchrun (--nnodes N --nproc_per_node 1), or set MASTER_ADDR, "
                    f"MASTER_PORT and NODE_RANK on every node (missing here: {', '.join(missing)})")
            rank = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
            cluster = Cluster(rank, num_nodes, env["MASTER_ADDR"], int(env["MASTER_PORT"]), "env")
    if cluster.num_nodes != num_nodes:
        raise ConfigError(f"trainer.num_nodes is {num_nodes} but the launcher ({cluster.launcher}) started "
                          f"{cluster.num_nodes} `rose-pl run` processes: start one per node")
    if not 0 <= cluster.node_rank < num_nodes:
        raise ConfigError(f"node rank {cluster.node_rank} is not in [0, {num_nodes})")
    return cluster


def _slurm_address() -> tuple[str, int]:
    """The coordination address Lightning's SLURMEnvironment derives from the job (root node, port from the job id),
    read without its side effect: its getters write MASTER_ADDR and MASTER_PORT into this process's environment,
    which every later process started from here (a stage, a test's DDP run) would then inherit."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        slurm = SLURMEnvironment()
        return slurm.main_address, slurm.main_port
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port(address: str = "") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class NodeGroup:
    """The `run` processes of all nodes, talking through one TCPStore."""

    def __init__(self, cluster: Cluster, timeout: float):
        from torch.distributed import PrefixStore, TCPStore

        self.cluster, self.timeout = cluster, float(timeout)
        self.rank, self.size = cluster.node_rank, cluster.num_nodes
        host = cluster.node_rank == 0 and not cluster.agent_store
        log.info("node %d of %d (%s): coordinating through %s:%d", self.rank, self.size, cluster.launcher,
                 cluster.address, cluster.port)
        store = TCPStore(cluster.address, cluster.port, self.size if host else None, is_master=host,
                         timeout=timedelta(seconds=self.timeout), wait_for_workers=False, multi_tenant=True)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = PrefixStore(f"rose_pl/{restart}/", store)
        self._step = 0
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="rose_pl-heartbeat")
        self._beat.start()

    # ---- plumbing --------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.store.add(f"heartbeat/{self.rank}", 1)
            except Exception:  # the store is gone: the waits below say so
                return

    def close(self) -> None:
        self._stop.set()

    def _set(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    def _get(self, key: str) -> dict:
        return json.loads(self.store.get(key))

    def _has(self, key: str) -> bool:
        return self.store.check([key])

    def _alive(self, rank: int) -> float:
        """Seconds since node `rank`'s heartbeat last moved (by this node's clock)."""
        beats = self.store.add(f"heartbeat/{rank}", 0)
        now = time.monotonic()
        last = self._seen.get(rank)
        if last is None or last[0] != beats:
            self._seen[rank] = (beats, now)
            return 0.0
        return now - last[1]

    def _ended(self) -> None:
        """A follower: if node 0 has ended the run, acknowledge it and stop (with node 0's reason if it failed)."""
        key = f"step/{self._step}"
        if self.rank != 0 and self._has(key):
            step = self._get(key)
            if step["kind"] == "end" and not step["ok"]:
                self.store.set(f"bye/{self.rank}", "1")
                raise NodeFailedError(f"node 0 stopped the run: {step['message']}")

    def _wait_for(self, keys: list[str], what: str, ranks: list[int], deadline: float | None = None) -> None:
        """Wait until every key is set, checking that the nodes in `ranks` still beat (and, on a follower, that node 0
        has not ended the run); a NodeFailedError says who stopped, or that the store's host vanished, and what this
        node was waiting for."""
        while True:
            try:
                if all(self._has(k) for k in keys):
                    return
                if keys != [f"step/{self._step}"]:
                    self._ended()
                for r in ranks:
                    if self._alive(r) > self.timeout:
                        raise NodeFailedError(f"node {r} stopped responding (no heartbeat for {self.timeout:.0f} s) "
                                              f"while node {self.rank} waited for {what}")
            except RoseError:
                raise
            except Exception as e:  # the store's host (node 0, or torchrun's agent) is gone
                first = str(e).splitlines()[0] if str(e) else ""
                raise NodeFailedError(f"node 0 (the coordinator) is gone ({type(e).__name__}: {first}) while node "
                                      f"{self.rank} waited for {what}") from None
            if deadline is not None and time.monotonic() > deadline:
                raise NodeFailedError(f"node {self.rank} waited {self.timeout:.0f} s for {what}")
            time.sleep(0.2)

    # ---- start -----------------------------------------------------------------------------------------
    def hello(self, facts: dict) -> None:
        """Every node tells node 0 what it sees (host, config fingerprint, input files, model check)."""
        self._set(f"hello/{self.rank}", {"host": socket.gethostname(), "pid": os.getpid(), **facts})

    def gather_hellos(self) -> dict[int, dict]:
        keys = [f"hello/{r}" for r in range(self.size)]
        try:
            self._wait_for(keys, "every node to start (`rose-pl run` on each node, the same command)", [],
                           deadline=time.monotonic() + self.timeout)
        except NodeFailedError:
            absent = [r for r in range(self.size) if not self._has(f"hello/{r}")]
            raise NodeFailedError(f"nodes {absent} did not start `rose-pl run` within {self.timeout:.0f} s "
                                  "(trainer.node_timeout)") from None
        return {r: self._get(f"hello/{r}") for r in range(self.size)}

    def check_shared_storage(self, output_dir: str) -> None:
        """Node 0 writes a token file into the output folder; every other node must read it back there."""
        path = Path(output_dir) / SHARED_CHECK
        if self.rank == 0:
            token = secrets.token_hex(8)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)
            self._set("storage", {"path": str(path), "token": token})
            keys = [f"storage/{r}" for r in range(1, self.size)]
            self._wait_for(keys, "every node to check the output folder", list(range(1, self.size)))
            bad = {r: self._get(f"storage/{r}") for r in range(1, self.size)}
            bad = {r: v for r, v in bad.items() if not v["ok"]}
            if bad:
                message = "; ".join(f"node {r} ({v['host']}): {v['problem']}" for r, v in bad.items())
                self.abort(f"the output folder {output_dir} is not on storage every node shares: {message}")
                raise NodeFailedError(f"the output folder {output_dir} is not on storage every node shares "
                                      f"({message}); put output_dir on a shared filesystem")
            path.unlink(missing_ok=True)
        else:
            self._wait_for(["storage"], "node 0 to check the inputs and write the shared-storage check", [0])
            expected = self._get("storage")
            if not path.is_file():
                problem = f"{path} does not exist here"
            elif path.read_text() != expected["token"]:
                problem = f"{path} holds another run's token"
            else:
                problem = None
            self._set(f"storage/{self.rank}", {"ok": problem is None, "problem": problem,
                                               "host": socket.gethostname()})

    # ---- node 0 ----------------------------------------------------------------------------------------
    def abort(self, message: str) -> None:
        """Tell the other nodes to stop, with the reason (best effort: the store may be gone)."""
        try:
            self._set(f"step/{self._step}", {"kind": "end", "ok": False, "message": message})
        except Exception:
            pass

    def finish(self, ok: bool, message: str = "") -> None:
        """Node 0: the run is over; wait (briefly) until every node has read it, so none sees the store vanish."""
        self._set(f"step/{self._step}", {"kind": "end", "ok": ok, "message": message})
        deadline = time.monotonic() + min(self.timeout, 60.0)
        while time.monotonic() < deadline:
            try:
                if all(self._has(f"bye/{r}") for r in range(1, self.size)):
                    return
            except Exception:
                return
            time.sleep(0.2)

    def run_everywhere(self, stage: str, args: list[str], log_file: str | None) -> None:
        """Node 0: start a Lightning stage on every node (this one included) and wait for every node's result."""
        port = free_port()
        step = self._step
        self._step += 1
        self._set(f"step/{step}", {"kind": "stage", "stage": stage, "args": args, "port": port,
                                   "address": self.cluster.address, "log_file": log_file})
        proc = _launch(args, (self.cluster.address, port), self.rank, log_file)
        self._collect(step, stage, proc)

    def _collect(self, step: int, stage: str, proc: subprocess.Popen) -> None:
        others = list(range(1, self.size))
        failed = None
        try:
            while True:
                code = proc.poll()
                reports = {r: self._get(f"result/{step}/{r}") for r in others if self._has(f"result/{step}/{r}")}
                bad = {r: v for r, v in reports.items() if not v["ok"]}
                if bad:
                    r, v = next(iter(bad.items()))
                    failed = f"stage {stage} failed on node {r} ({v['host']}): {v['message']}"
                    break
                for r in others:
                    if r not in reports and self._alive(r) > self.timeout:
                        failed = (f"node {r} stopped responding (no heartbeat for {self.timeout:.0f} s) during stage "
                                  f"{stage}")
                if failed:
                    break
                if code is not None and code != 0:
                    # Another node's death often shows here first (a collective fails): give its report a moment.
                    time.sleep(min(5.0, self.timeout))
                    late = {r: self._get(f"result/{step}/{r}") for r in others if self._has(f"result/{step}/{r}")}
                    late = {r: v for r, v in late.items() if not v["ok"]}
                    silent = [r for r in others if r not in late and not self._has(f"result/{step}/{r}")
                              and self._alive(r) > HEARTBEAT_SECONDS * 3]
                    where = "; ".join([f"node {r}: {v['message']}" for r, v in late.items()]
                                      + [f"node {r} stopped responding" for r in silent])
                    failed = f"stage {stage} failed on node 0 (exit code {code})" + (f"; {where}" if where else "")
                    break
                if code == 0 and len(reports) == len(others):
                    return
                time.sleep(0.2)
        finally:
            _stop(proc)
        self.abort(failed)
        raise NodeFailedError(failed + "; rerun the same command on every node to resume")

    # ---- the other nodes -------------------------------------------------------------------------------
    def follow(self) -> None:
        """Run the stages node 0 publishes, in order, until it says the run is over."""
        last = "the first stage"
        while True:
            key = f"step/{self._step}"
            self._wait_for([key], f"node 0's next step after {last}", [0])
            step = self._get(key)
            if step["kind"] == "end":
                self.store.set(f"bye/{self.rank}", "1")
                if not step["ok"]:
                    raise NodeFailedError(f"node 0 stopped the run: {step['message']}")
                log.info("node %d: node 0 finished the run", self.rank)
                return
            last = f"stage {step['stage']}"
            log.info("node %d: stage %s", self.rank, step["stage"])
            log_file = step.get("log_file")
            if log_file:
                log_file = str(Path(log_file).with_suffix(f".node{self.rank}.log"))
            proc = _launch(step["args"], (step["address"], step["port"]), self.rank, log_file)
            result_key = f"result/{self._step}/{self.rank}"
            end_key = f"step/{self._step + 1}"
            try:
                while proc.poll() is None:
                    if self._has(end_key) and self._get(end_key)["kind"] == "end":
                        break  # node 0 gave up on this step (another node failed)
                    if self._alive(0) > self.timeout:
                        raise NodeFailedError(f"node 0 stopped responding during stage {step['stage']}")
                    time.sleep(0.2)
            except RoseError:
                raise
            except Exception as e:
                raise NodeFailedError(f"node 0 (the coordinator) is gone ({type(e).__name__}) during stage "
                                      f"{step['stage']}") from None
            finally:
                _stop(proc)
            code = proc.returncode
            ok = code == 0
            self._set(result_key, {"ok": ok, "host": socket.gethostname(),
                                   "message": "" if ok else f"`rose-pl {' '.join(step['args'])}` exited with code "
                                                            f"{code} (its log: {log_file or 'this node'})"})
            self._step += 1


def _stop(proc: subprocess.Popen) -> None:
    """End a stage process that is still running (it may hang in a collective whose peer is gone)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _launch(args: list[str], master: tuple[str, int], node_rank: int, log_file: str | None) -> subprocess.Popen:
    env = stage_env(master, node_rank)
    if log_file:
        env["ROSE_PL_LOG_FILE"] = log_file
    return subprocess.Popen([sys.executable, "-m", "rose_pl", *args], env=env)
