"""The package's public names resolve to the documented objects, whatever was imported first."""

import importlib
import pkgutil
import subprocess
import sys
import types

import keras_fcn_surgery as kfs


def test_every_public_name_is_a_function_or_class_even_after_all_submodules_load():
    for module in pkgutil.walk_packages(kfs.__path__, "keras_fcn_surgery."):
        importlib.import_module(module.name)
    for name in kfs.__all__:
        assert not isinstance(getattr(kfs, name), types.ModuleType), name
    assert callable(kfs.geometry) and callable(kfs.heatmap)


def test_importing_the_package_and_cli_help_do_not_start_tensorflow():
    code = (
        "import sys, keras_fcn_surgery, keras_fcn_surgery.cli\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
