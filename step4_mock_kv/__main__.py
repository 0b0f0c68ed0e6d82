from step4_mock_kv.server import main

main()
