from services.prewarm_orchestrator.main import main

if __name__ == "__main__":
    main()
