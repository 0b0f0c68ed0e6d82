from step10_disaggregated.server import main

main()
