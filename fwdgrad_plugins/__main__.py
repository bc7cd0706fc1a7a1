"""``python -m fwdgrad_plugins list``: what is registered, by kind."""

import argparse

from fwdgrad_plugins.plugins import KINDS, plugin_manager, registered


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fwdgrad_plugins", description=__doc__)
    parser.add_argument("command", choices=["list"], help="list registered plugins by kind")
    parser.parse_args(argv)
    for kind in KINDS:
        print(f"{kind}:")
        for name in registered(kind):
            print(f"  {name}")
    print("plugins loaded:", ", ".join(name for name, _ in plugin_manager().list_name_plugin()))


if __name__ == "__main__":
    main()
