from step3_batching.server import main

main()
