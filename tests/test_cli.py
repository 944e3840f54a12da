"""The CLI shell: lazy imports, the agent list shared by both stages, shared flags."""
import subprocess
import sys

from click.testing import CliRunner

from pipelines.cli import COMMANDS, main


def test_help_lists_every_command_without_importing_torch():
    script = ("import sys\nfrom click.testing import CliRunner\nfrom pipelines.cli import main\n"
              "result = CliRunner().invoke(main, ['--help'])\nassert result.exit_code == 0, result.output\n"
              "print(result.output)\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip().endswith("NO-TORCH")
    for name in COMMANDS:
        assert name in output.stdout


def test_stage_two_agent_list_matches_the_extract_registry():
    from extract.agents import registry
    from pipelines.presets import AGENTS

    assert sorted(AGENTS) == sorted(registry())


def test_every_agent_spec_is_complete():
    from extract.agents import registry
    from extract.agents.base import FAMILIES

    for name, spec in registry().items():
        assert spec.family in FAMILIES and spec.emits and spec.preprocessing and spec.tiny_config, name
        assert callable(spec.load)


def test_unknown_command_is_an_error():
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code != 0 and "No such command" in result.output
