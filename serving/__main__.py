from serving.http.server import main

main()
