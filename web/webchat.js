// The chat page: one WebSocket to the server that served this page.
//
// Why it differs from the seed's websocket.js:
// - The socket URL is built from the page's own location (wss: under https,
//   ws: otherwise; same host and port; path /ws), so the page works behind
//   any host name, port or TLS proxy without editing a hard-coded address.
// - Messages are inserted with textContent, never innerHTML: the seed's
//   `innerHTML +=` ran whatever HTML a chatter sent in everyone's browser.
// - A lost connection is retried by itself with capped, jittered exponential
//   backoff (0.5 s doubling to 10 s, each wait drawn from [d/2, d]), so a
//   restarted server is not stampeded by every open tab at the same instant.
// - The server never echoes a message to its sender, so the page shows our
//   own messages itself, marked "you: ".
'use strict';

(() => {
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;

  const STATUS = {
    idle: 'Not connected',
    open: 'Connected',
    closed: 'Connection closed',
    error: 'An error occurred',
  };

  const statusElement = document.getElementById('status');
  const messageList = document.getElementById('messages');
  const form = document.getElementById('message-form');
  const input = document.getElementById('message-input');
  const sendButton = document.getElementById('send-button');

  let socket = null;
  let failedAttempts = 0;
  let retryTimer = null;

  function socketURL() {
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${window.location.host}/ws`;
  }

  function setStatus(state, text = STATUS[state]) {
    statusElement.textContent = text;
    statusElement.dataset.state = state;
    sendButton.disabled = state !== 'open';
  }

  // Only scroll the log if the reader is already at the bottom (or it is our
  // own message), so scrolling back to read is not undone by every new line.
  function isScrolledToBottom() {
    const slack = 24;
    return messageList.scrollHeight - messageList.scrollTop - messageList.clientHeight < slack;
  }

  function appendMessage(sender, text, mine) {
    const follow = mine || isScrolledToBottom();
    const item = document.createElement('li');
    item.className = mine ? 'message mine' : 'message';
    if (sender) {
      const label = document.createElement('span');
      label.className = 'sender';
      label.textContent = sender;
      item.append(label);
    }
    item.append(document.createTextNode(text));
    messageList.append(item);
    if (follow) {
      messageList.scrollTop = messageList.scrollHeight;
    }
  }

  // The server sends "id N: text"; the "id N: " part is styled as the sender.
  // Anything else is shown whole.  Either way it stays plain text.
  function showReceived(data) {
    const match = /^(id \d+: )([\s\S]*)$/.exec(data);
    if (match) {
      appendMessage(match[1], match[2], false);
    } else {
      appendMessage('', data, false);
    }
  }

  function backoffDelay(attempt) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function scheduleReconnect() {
    if (retryTimer !== null) {
      return;
    }
    const delay = backoffDelay(failedAttempts);
    failedAttempts += 1;
    setStatus('closed', `${STATUS.closed} — reconnecting…`);
    retryTimer = window.setTimeout(() => {
      retryTimer = null;
      connect();
    }, delay);
  }

  function connect() {
    let ws;
    try {
      ws = new WebSocket(socketURL());
    } catch (error) {
      setStatus('error');
      scheduleReconnect();
      return;
    }
    socket = ws;

    // Handlers check `socket === ws` so a late event from an abandoned
    // socket cannot overwrite the state of the current one.
    ws.addEventListener('open', () => {
      if (socket !== ws) return;
      failedAttempts = 0;
      setStatus('open');
    });
    ws.addEventListener('message', (event) => {
      if (socket !== ws) return;
      if (typeof event.data === 'string') {
        showReceived(event.data);
      }
    });
    ws.addEventListener('error', () => {
      if (socket !== ws) return;
      setStatus('error');
    });
    ws.addEventListener('close', () => {
      if (socket !== ws) return;
      socket = null;
      setStatus('closed');
      scheduleReconnect();
    });
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = input.value;
    if (text.trim() === '' || socket === null || socket.readyState !== WebSocket.OPEN) {
      return; // keep the draft; Send is disabled until we are connected
    }
    socket.send(text);
    appendMessage('you: ', text, true);
    input.value = '';
    input.focus();
  });

  // Back online (laptop lid, phone leaving a tunnel): try now, not after the backoff.
  window.addEventListener('online', () => {
    if (retryTimer !== null) {
      window.clearTimeout(retryTimer);
      retryTimer = null;
      connect();
    }
  });

  setStatus('idle');
  connect();
})();
