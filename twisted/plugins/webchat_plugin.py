from twisted.application.service import ServiceMaker

webchat = ServiceMaker("webchat", "webchat.tap", "WebSocket chat server", "webchat")
