"""CLI subcommands: one module each, with ``add_parser(subparsers)`` that sets ``run``.

A module's ``run(args)`` returns an exit code and raises library errors; `cli.main`
turns those into messages and exit codes.
"""

COMMAND_MODULES = (
    "keras_fcn_surgery.commands.convert",
    "keras_fcn_surgery.commands.demo",
    "keras_fcn_surgery.commands.export",
    "keras_fcn_surgery.commands.graph",
    "keras_fcn_surgery.commands.heatmap",
    "keras_fcn_surgery.commands.predict",
    "keras_fcn_surgery.commands.segment",
    "keras_fcn_surgery.commands.show",
)
