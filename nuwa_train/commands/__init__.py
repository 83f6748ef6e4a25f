"""The `nuwa-train` commands, one module each: its flags (`add_parser(subparsers)`) and what it runs.

`nuwa_train.cli.main` builds its parser from COMMAND_MODULES, in this order (that of `nuwa-train --help`).
A module is imported only when the parser is built, and imports its heavy dependencies (torch, Lightning,
models) inside its handler where it can: `import nuwa_train.cli` stays cheap.
"""

COMMAND_MODULES = (
    "bench",
    "demo",
    "eval",
    "export",
    "pretrain_base",
    "export_data",
    "chat",
    "serve",
    "lightning",  # fit, validate, test
)
