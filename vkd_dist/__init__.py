"""Variational knowledge distillation for chest X-ray classification, at cluster scale.

The help formatters below are shared by every console script (vkd-data, vkd-train, vkd-slurm, ...):
the package is the one module all of them import, so the formatters live here rather than in a copy per CLI.
"""

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is no value to show: None (the help says
    what happens instead), a flag's False, an empty list (append options), or help that already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or (isinstance(default, (list, tuple)) and not default):
            return action.help or ""
        return super()._get_help_string(action) or ""


class RawDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsHelpFormatter for a parser whose description (or epilog) has preformatted lines."""
