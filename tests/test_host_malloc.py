"""host_malloc: when the entry points re-execute themselves with glibc's malloc settings."""

import fnmatch
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mae_st_jax import host_malloc

ARGV = ["python", "-m", "mae_st_jax.main"]


def wanted(environ, devices=(), libc="glibc", argv=ARGV):
    return host_malloc.wanted(environ, exists=lambda pattern: fnmatch.filter(devices, pattern),
                              libc=libc, argv=argv)


def test_cpu_only_host_wants_the_settings():
    assert wanted({}) == sys.platform.startswith("linux")
    assert wanted({"JAX_PLATFORMS": "cpu"}) == sys.platform.startswith("linux")


@pytest.mark.parametrize("environ,devices,libc,argv", [
    ({}, ["/dev/nvidiactl"], "glibc", ARGV),  # a GPU host
    ({}, ["/dev/accel0"], "glibc", ARGV),  # a TPU VM
    ({"JAX_PLATFORMS": "tpu"}, [], "glibc", ARGV),
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], "glibc", ARGV),
    ({host_malloc.OPT_OUT: "0"}, [], "glibc", ARGV),  # opted out
    ({"MALLOC_ARENA_MAX": "4"}, [], "glibc", ARGV),  # the user's own setting wins
    ({"MALLOC_MMAP_MAX_": "0"}, [], "glibc", ARGV),  # already re-executed (or set by hand)
    ({}, [], "", ARGV),  # musl and other libcs
    ({}, [], "glibc", ["python"]),  # an interactive interpreter
])
def test_no_reexec(environ, devices, libc, argv):
    assert not wanted(environ, devices, libc, argv)


def test_jax_platforms_cpu_overrides_device_nodes():
    assert wanted({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidiactl"]) == sys.platform.startswith("linux")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"),
                    reason="the re-exec only happens on Linux with glibc")
def test_reexec_runs_the_command_once_more_with_the_settings(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("start", os.environ.get("MALLOC_ARENA_MAX"), flush=True)
        from mae_st_jax import host_malloc
        host_malloc.reexec()
        print("running", sys.argv[1:], {k: os.environ.get(k) for k in host_malloc.SETTINGS}, flush=True)
    """))
    env = {k: v for k, v in os.environ.items() if k not in host_malloc.SETTINGS and k != host_malloc.OPT_OUT}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(host_malloc.__file__))),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "start None"  # the first process, without the settings
    assert out[1] == "start 1"  # the same command again, with them
    assert out[2] == f"running ['--flag=1'] {host_malloc.SETTINGS}"
    assert len(out) == 3  # once: the re-executed process does not re-execute again
    env[host_malloc.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["start None", f"running [] { {k: None for k in host_malloc.SETTINGS} }"]
