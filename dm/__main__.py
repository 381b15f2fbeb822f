from dm.cli import program

program()
