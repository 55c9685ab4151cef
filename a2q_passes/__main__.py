from a2q_passes.cli import main

main()
