"""dumpcap | tshark under pyshark, run so that nothing outlives a capture (the sniffer's process side).

:class:`PrivateLiveCapture` and the pyshark traps it avoids (pyshark 0.6, pinned). Imported only by
app/services/collector/sniffer.py when a capture starts, so pyshark loads only where a sniffer runs.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal

from pyshark import LiveCapture
from pyshark.tshark.tshark import get_process_path, tshark_supports_duplicate_keys

log = logging.getLogger(__name__)

REAP_SECONDS = 2.0             # wait for a killed process to be reaped


class PrivateLiveCapture(LiveCapture):
    """A pyshark LiveCapture whose dumpcap and tshark run in their own sessions with a private temp
    directory (``temp_dir``), with the parent's pipe ends closed; keyword arguments as LiveCapture's.

    How the capture is run, and the pyshark traps it avoids:

    - **Bounded window.** ``sniff(timeout=...)`` followed by iterating the capture starts a second,
      endless capture; ``apply_on_packets(timeout=...)`` loses what tshark held back. Neither is used:
      :meth:`Sniffer.run` reads tshark's stdout itself with its own monotonic deadline, then stops
      dumpcap (SIGTERM), so tshark sees the end of its input, flushes, prints the closing ``]`` and
      exits; the stream is drained for at most ``drain_seconds``, then every process left is killed.
      A run returns within ``window_seconds + drain_seconds + ~2 s`` (process reaping), whatever
      tshark does. The stop is immediate: packets the kernel still held for dumpcap at that instant
      (milliseconds' worth) are not in the sample. ``max_packets`` is also passed as ``tshark -c``,
      so tshark stops by itself there.
    - **JSON holds back the last packet.** pyshark's JSON framing emits a packet when it sees the
      next one's separator; the drain above lets tshark write the final ``}]``, so the last packet
      of the window is kept, not lost.
    - **JSON, fields only.** ``use_json=True`` (about 10x faster than pyshark's XML) plus tshark
      ``-e`` field selection: tshark prints only the ~20 fields below instead of every layer, and
      Python only ``json.loads`` a small dict per packet (no pyshark ``Packet``/``JsonLayer``
      objects). ``include_raw`` stays False.
    - **Temp files.** tshark reading a pipe (pyshark's ``-i -``) runs its own dumpcap, which writes
      a ``wireshark_*.pcapng`` temp file, left in /tmp whenever tshark is killed. Every capture gets
      a private ``tempfile.mkdtemp`` directory (``--temp-dir`` and ``TMPDIR``), removed afterwards.
    - **No orphans.** dumpcap and tshark each start in their own session (process group); the group
      is killed at the end, which takes tshark's dumpcap child with it. pyshark 0.6 also leaks both
      ends of the dumpcap -> tshark pipe in the parent (so tshark would never see EOF); they are
      closed here right after each spawn. Each run has its own asyncio event loop, closed at the end,
      so the sniffer can run in any thread.
    - **Odd packets.** A packet tshark could only partly dissect is kept with what it gave (a bad
      IPv4 header: ``protocols='eth:ethertype:ip'``, no addresses); one whose JSON or fields cannot
      be turned into a record is skipped and counted (``SniffResult.skipped``).
    """

    def __init__(self, *, temp_dir: str, **kw):
        super().__init__(use_json=True, include_raw=False, **kw)
        self.temp_dir = temp_dir
        self.sessions: list = []           # asyncio processes, each its own process group
        self.stderr_lines: dict = {}       # pid -> deque of its last stderr lines
        self._feeder = None                # pyshark's dumpcap, writing pcapng into tshark's stdin

    def _verify_capture_parameters(self):
        """Skip pyshark's check (another `tshark -D`): Sniffer.check looked at /sys/class/net."""

    async def _get_tshark_process(self, packet_count=None, stdin=None):
        env = dict(os.environ, TMPDIR=self.temp_dir)
        read_fd, write_fd = os.pipe()
        try:
            dumpcap = [get_process_path(process_name="dumpcap", tshark_path=self.tshark_path),
                       *self._get_dumpcap_parameters()]
            self._feeder = await asyncio.create_subprocess_exec(
                *dumpcap, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=asyncio.subprocess.PIPE,
                env=env, start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.sessions.append(self._feeder)
        self._watch_stderr(self._feeder)
        try:
            tshark = [self._get_tshark_path(), "-l", "-n", "-T", "json"]
            if tshark_supports_duplicate_keys(self._get_tshark_version()):
                tshark.append("--no-duplicate-keys")
            tshark += self.get_parameters(packet_count=packet_count)
            process = await asyncio.create_subprocess_exec(
                *tshark, stdin=read_fd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env, start_new_session=True)
        finally:
            os.close(read_fd)
        self.sessions.append(process)
        self._watch_stderr(process)
        return process

    def _watch_stderr(self, process):
        """Keep each process's last stderr lines (pyshark keeps one line for all of them)."""
        lines = self.stderr_lines.setdefault(process.pid, collections.deque(maxlen=20))

        async def read():
            while line := await process.stderr.readline():
                lines.append(line.decode(errors="replace").strip())

        self._stderr_handling_tasks.append(asyncio.ensure_future(read()))

    def failure(self) -> str | None:
        """The error a process that failed (exit status > 0) gave, or None when none failed."""
        for process in self.sessions:
            if process.returncode is not None and process.returncode > 0:
                lines = [line for line in self.stderr_lines.get(process.pid, ()) if line]
                said = [line.split(":", 1)[1].strip() for line in lines
                        if line.startswith(("dumpcap:", "tshark:")) and line.split(":", 1)[1].strip()]
                return (said or lines or [f"exit status {process.returncode}"])[0]
        return None

    def stop_feeding(self):
        """End tshark's input: dumpcap stops on SIGTERM, closing the pipe."""
        if self._feeder is not None and self._feeder.returncode is None:
            try:
                self._feeder.terminate()
            except ProcessLookupError:
                pass

    async def kill_all(self):
        """Kill every process group (also of a process that exited: tshark's own dumpcap is in
        tshark's group), reap them, finish the stderr readers."""
        for process in self.sessions:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for process in self.sessions:
            try:
                await asyncio.wait_for(process.wait(), REAP_SECONDS)
            except asyncio.TimeoutError:
                log.warning("sniffer: process %d did not exit after SIGKILL", process.pid)
        if self._stderr_handling_tasks:
            await asyncio.wait(self._stderr_handling_tasks, timeout=REAP_SECONDS)
        self._running_processes.clear()     # pyshark's __del__ would try to close them again
