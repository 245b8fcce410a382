// The chat page: one WebSocket (JSON events, subprotocol webchat.v1.json) to
// the server that served this page.  docs/protocol.md describes the events.
//
// Why it is built this way:
// - The room comes from the URL (/r/<room> or /#room, else "lobby"), and the
//   socket URL from the page's own location (wss: under https, same host and
//   port, path /ws/<room>), so the page works behind any host name, port or
//   TLS proxy without editing a hard-coded address.
// - Everything people type is inserted with textContent, never innerHTML: the
//   seed's `innerHTML +=` ran whatever HTML a chatter sent in everyone's
//   browser.  Line breaks are kept by CSS (white-space: pre-wrap), not <br>.
// - A message is never shown as sent when it was not: it stays "sending" until
//   the server's `ack` for its `ref`, and is marked failed with the reason of
//   an `error` for that ref, or when the connection closes before the ack.
// - A lost connection is retried by itself with capped, jittered exponential
//   backoff (0.5 s doubling to 10 s, each wait drawn from [d/2, d]), so a
//   restarted server is not stampeded by every open tab at the same instant;
//   the status line says why it closed (code and reason) meanwhile.
'use strict';

(() => {
  const PROTOCOL = 'webchat.v1.json';
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const DEFAULT_ROOM = 'lobby';
  const ROOM_NAME = /^[A-Za-z0-9._-]{1,64}$/;
  const NAME_KEY = 'webchat.name';
  // Two messages of one sender this close together share one header.
  const GROUP_WINDOW_MS = 5 * 60 * 1000;
  // The server relays at most one typing event per 2 s per member; a typist
  // is shown a little longer than that, so steady typing does not flicker.
  const TYPING_SEND_MS = 2000;
  const TYPING_SHOW_MS = 4000;
  // Shown until the server's welcome says otherwise (the server's default).
  const FALLBACK_MAX_TEXT_BYTES = 65280;

  const STATUS = {
    idle: 'Not connected',
    connecting: 'Connecting…',
    open: 'Connected',
    closed: 'Connection closed',
    error: 'An error occurred',
  };

  const byId = (id) => document.getElementById(id);
  const statusElement = byId('status');
  const roomNameElement = byId('room-name');
  const messageList = byId('messages');
  const memberList = byId('members');
  const memberCount = byId('member-count');
  const form = byId('message-form');
  const input = byId('message-input');
  const sendButton = byId('send-button');
  const limitNote = byId('limit-note');
  const nameForm = byId('name-form');
  const nameInput = byId('name-input');
  const nameNote = byId('name-note');
  const roomForm = byId('room-form');
  const roomInput = byId('room-input');
  const roomNote = byId('room-note');
  const newMessagesButton = byId('new-messages');
  const typingLine = byId('typing');
  const encoder = new TextEncoder();
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

  let room = roomFromLocation();
  let socket = null;
  let failedAttempts = 0;
  let retryTimer = null;
  let myId = null;
  let maxTextBytes = FALLBACK_MAX_TEXT_BYTES;
  let nextRef = 1;
  let unread = 0;
  // Online members of the room in join order: id -> name.
  const members = new Map();
  // Our messages still waiting for their ack: ref -> list item.
  const pending = new Map();
  // The last error event without a ref: the reason a policy close is about to give.
  let lastError = null;
  // Who is typing: id -> timer that forgets them.
  const typists = new Map();
  let lastTypingSent = 0;
  // A name event sent and not yet answered (by a name event or an error).
  let renaming = false;

  // -- the room and the name ---------------------------------------------------

  function roomFromLocation() {
    const path = /^\/r\/([^/]+)\/?$/.exec(window.location.pathname);
    let candidate = path ? path[1] : window.location.hash.replace(/^#/, '');
    try {
      candidate = decodeURIComponent(candidate);
    } catch (error) {
      candidate = '';
    }
    return ROOM_NAME.test(candidate) ? candidate : DEFAULT_ROOM;
  }

  function storedName() {
    try {
      return (window.localStorage.getItem(NAME_KEY) || '').trim();
    } catch (error) {
      return ''; // storage disabled: a guest name every visit
    }
  }

  function storeName(name) {
    try {
      window.localStorage.setItem(NAME_KEY, name);
    } catch (error) {
      // storage disabled: the name lasts as long as the tab
    }
  }

  function showRoom() {
    roomNameElement.textContent = room;
    document.title = titleText();
  }

  function titleText() {
    const base = `#${room} — WebChat`;
    return unread > 0 ? `(${unread}) ${base}` : base;
  }

  // -- the status line ---------------------------------------------------------

  function setStatus(state, text = STATUS[state]) {
    statusElement.textContent = text;
    statusElement.dataset.state = state;
    updateSendButton();
  }

  function isOpen() {
    return socket !== null && socket.readyState === WebSocket.OPEN && myId !== null;
  }

  // -- the message limit -------------------------------------------------------

  function byteLength(text) {
    return encoder.encode(text).length;
  }

  function updateSendButton() {
    const size = byteLength(input.value);
    // 0: the server sets no limit (it runs with --max-message-size 0).
    const tooBig = maxTextBytes > 0 && size > maxTextBytes;
    input.setAttribute('aria-invalid', tooBig ? 'true' : 'false');
    if (tooBig) {
      limitNote.textContent = `Too long: ${size} of at most ${maxTextBytes} bytes`;
    } else if (maxTextBytes > 0 && size > maxTextBytes * 0.9) {
      const left = maxTextBytes - size;
      limitNote.textContent = `${left} ${left === 1 ? 'byte' : 'bytes'} left`;
    } else {
      limitNote.textContent = '';
    }
    sendButton.disabled = !isOpen() || tooBig || input.value.trim() === '';
  }

  // -- the log -------------------------------------------------------------------

  // Only scroll the log if the reader is already at the bottom (or it is our
  // own message), so scrolling back to read is not undone by every new line.
  function isScrolledToBottom() {
    const slack = 24;
    return messageList.scrollHeight - messageList.scrollTop - messageList.clientHeight < slack;
  }

  function scrollToBottom() {
    messageList.scrollTop = messageList.scrollHeight;
    newMessagesButton.hidden = true;
  }

  function addToLog(item, mine) {
    const follow = mine || isScrolledToBottom();
    messageList.append(item);
    if (follow) {
      scrollToBottom();
    } else {
      newMessagesButton.hidden = false;
    }
    if (!mine && document.hidden) {
      unread += 1;
      document.title = titleText();
    }
  }

  function timeElement(ms) {
    const time = document.createElement('time');
    time.className = 'time';
    const when = new Date(ms);
    time.dateTime = when.toISOString();
    time.textContent = timeFormat.format(when);
    time.title = when.toLocaleString();
    return time;
  }

  // A message: header (sender, time), text, and for ours a delivery state.
  // A message right after one of the same sender joins its group: the header
  // is then hidden visually but still read out by screen readers.
  function appendMessage({ senderId, name, text, ts, mine }) {
    const item = document.createElement('li');
    item.className = mine ? 'message mine' : 'message';
    item.dataset.sender = String(senderId);
    item.dataset.ts = String(ts);

    const previous = messageList.lastElementChild;
    if (
      previous &&
      previous.classList.contains('message') &&
      !previous.classList.contains('failed') &&
      previous.dataset.sender === item.dataset.sender &&
      ts - Number(previous.dataset.ts) < GROUP_WINDOW_MS
    ) {
      item.classList.add('grouped');
    }

    const header = document.createElement('span');
    header.className = 'meta';
    const sender = document.createElement('span');
    sender.className = 'sender';
    sender.textContent = mine ? `${name} (you)` : name;
    header.append(sender, ' ', timeElement(ts));

    const body = document.createElement('span');
    body.className = 'text';
    body.dir = 'auto';
    body.textContent = text;

    // A grouped message hides its header: its time is still there on hover.
    item.title = new Date(ts).toLocaleString();
    item.append(header, body);
    if (mine) {
      const state = document.createElement('span');
      state.className = 'delivery';
      item.append(state);
    }
    addToLog(item, mine);
    return item;
  }

  // Join, leave, rename and connection notices: one quiet line.
  function appendNotice(text) {
    const item = document.createElement('li');
    item.className = 'notice';
    item.textContent = text;
    addToLog(item, true);
  }

  function setDelivery(item, state, text) {
    // A longer label (a failure's reason) must not push the end out of view.
    const follow = isScrolledToBottom();
    item.classList.remove('pending', 'failed');
    if (state) {
      item.classList.add(state);
    }
    const label = item.querySelector('.delivery');
    if (label) {
      label.textContent = text;
    }
    if (follow) {
      scrollToBottom();
    }
  }

  function failPending(reason) {
    for (const item of pending.values()) {
      setDelivery(item, 'failed', `Not sent: ${reason}`);
    }
    pending.clear();
  }

  // -- who is online -------------------------------------------------------------

  function renderMembers() {
    memberList.replaceChildren();
    for (const [id, name] of members) {
      const item = document.createElement('li');
      item.dataset.id = String(id);
      item.textContent = name;
      if (id === myId) {
        item.className = 'me';
        const you = document.createElement('span');
        you.className = 'you';
        you.textContent = ' (you)';
        item.append(you);
      }
      memberList.append(item);
    }
    memberCount.textContent = `(${members.size})`;
  }

  // The name prompt: until a name is chosen (and remembered), the field is
  // empty and asks for one (the online list shows the guest name meanwhile).
  function showOwnName() {
    nameInput.value = storedName() ? nameOf(myId) : '';
  }

  function nameOf(id) {
    return members.get(id) || `guest-${id}`;
  }

  // -- events from the server ------------------------------------------------------

  function onWelcome(event) {
    myId = event.id;
    renaming = false;
    members.clear();
    for (const member of event.members || []) {
      members.set(member.id, member.name);
    }
    members.set(event.id, event.name);
    if (event.limits && Number.isInteger(event.limits.max_text_bytes)) {
      maxTextBytes = event.limits.max_text_bytes;
    }
    typists.clear();
    showTypists();
    showOwnName();
    renderMembers();
    failedAttempts = 0;
    lastError = null;
    setStatus('open');
  }

  function showTypists() {
    const names = [...typists.keys()].map(nameOf);
    if (names.length === 0) {
      typingLine.textContent = '';
    } else if (names.length <= 3) {
      typingLine.textContent = `${names.join(', ')} ${names.length === 1 ? 'is' : 'are'} typing…`;
    } else {
      typingLine.textContent = 'Several people are typing…';
    }
  }

  function stopTyping(id) {
    if (typists.has(id)) {
      window.clearTimeout(typists.get(id));
      typists.delete(id);
      showTypists();
    }
  }

  function onTyping(event) {
    stopTyping(event.id);
    typists.set(event.id, window.setTimeout(() => stopTyping(event.id), TYPING_SHOW_MS));
    showTypists();
  }

  function onMessage(event) {
    stopTyping(event.id);
    appendMessage({
      senderId: event.id,
      name: event.name,
      text: event.text,
      ts: event.ts,
      mine: event.id === myId,
    });
  }

  function onAck(event) {
    const item = pending.get(event.ref);
    if (!item) return;
    pending.delete(event.ref);
    item.dataset.ts = String(event.ts);
    item.dataset.seq = String(event.seq);
    const time = item.querySelector('time');
    if (time) time.replaceWith(timeElement(event.ts));
    setDelivery(item, null, '');
  }

  function onError(event) {
    const reason = event.reason || event.code || 'refused';
    if (event.ref !== undefined && event.ref !== null && pending.has(event.ref)) {
      setDelivery(pending.get(event.ref), 'failed', `Not sent: ${reason}`);
      pending.delete(event.ref);
      return;
    }
    if (event.code === 'bad_name' || event.code === 'name_taken') {
      nameNote.textContent = reason;
      if (!renaming) {
        // The remembered name (sent as ?name=) was refused: stop sending it.
        storeName('');
      }
      renaming = false;
      showOwnName();
      return;
    }
    lastError = reason;
    appendNotice(`Server: ${reason}`);
  }

  function onJoin(event) {
    members.set(event.member.id, event.member.name);
    renderMembers();
    appendNotice(`${event.member.name} joined`);
  }

  function onLeave(event) {
    stopTyping(event.member.id);
    members.delete(event.member.id);
    renderMembers();
    appendNotice(`${event.member.name} left`);
  }

  function onName(event) {
    members.set(event.id, event.name);
    renderMembers();
    if (event.id === myId) {
      renaming = false;
      storeName(event.name);
      showOwnName();
      nameNote.textContent = '';
      appendNotice(`You are now ${event.name}`);
    } else {
      appendNotice(`${event.old} is now ${event.name}`);
    }
  }

  const HANDLERS = {
    welcome: onWelcome,
    message: onMessage,
    ack: onAck,
    error: onError,
    join: onJoin,
    leave: onLeave,
    name: onName,
    typing: onTyping,
  };

  function receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch (error) {
      return; // not ours to show: the server only sends JSON on this protocol
    }
    const handler = event && HANDLERS[event.type];
    if (handler) {
      handler(event);
    }
  }

  // -- the connection ----------------------------------------------------------------

  function socketURL() {
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const name = storedName();
    const query = name ? `?name=${encodeURIComponent(name)}` : '';
    return `${scheme}//${window.location.host}/ws/${encodeURIComponent(room)}${query}`;
  }

  function backoffDelay(attempt) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function closeText(code, reason) {
    const why = reason || lastError;
    return why ? `code ${code}: ${why}` : `code ${code}`;
  }

  function scheduleReconnect(why) {
    if (retryTimer !== null) {
      return;
    }
    const delay = backoffDelay(failedAttempts);
    failedAttempts += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    setStatus('closed', `${STATUS.closed} (${why}) — reconnecting in ${seconds} s…`);
    retryTimer = window.setTimeout(() => {
      retryTimer = null;
      connect();
    }, delay);
  }

  function connect() {
    let ws;
    myId = null;
    try {
      ws = new WebSocket(socketURL(), PROTOCOL);
    } catch (error) {
      setStatus('error');
      scheduleReconnect('could not connect');
      return;
    }
    socket = ws;
    setStatus('connecting');

    // Handlers check `socket === ws` so a late event from an abandoned
    // socket (a room switch) cannot overwrite the state of the current one.
    ws.addEventListener('message', (event) => {
      if (socket !== ws) return;
      if (typeof event.data === 'string') {
        receive(event.data);
      }
    });
    ws.addEventListener('close', (event) => {
      if (socket !== ws) return;
      socket = null;
      myId = null;
      const why = closeText(event.code, event.reason);
      lastError = null;
      failPending(`the connection closed before the server confirmed it (${why})`);
      scheduleReconnect(why);
    });
  }

  function leaveRoom() {
    if (socket !== null) {
      const old = socket;
      socket = null;
      old.close(1000, 'switching rooms');
    }
    if (retryTimer !== null) {
      window.clearTimeout(retryTimer);
      retryTimer = null;
    }
    failPending('you left the room before the server confirmed it');
    members.clear();
    renderMembers();
    for (const id of [...typists.keys()]) stopTyping(id);
    messageList.replaceChildren();
    newMessagesButton.hidden = true;
    failedAttempts = 0;
  }

  function switchRoom(next) {
    if (next === room && socket !== null) {
      return;
    }
    leaveRoom();
    room = next;
    showRoom();
    connect();
  }

  // -- what the person does -------------------------------------------------------------

  function send() {
    const text = input.value;
    if (text.trim() === '' || !isOpen() || sendButton.disabled) {
      return; // keep the draft; Send says why it is disabled
    }
    const ref = `c${nextRef}`;
    nextRef += 1;
    socket.send(JSON.stringify({ type: 'message', text, ref }));
    const item = appendMessage({
      senderId: myId,
      name: nameOf(myId),
      text,
      ts: Date.now(),
      mine: true,
    });
    item.dataset.ref = ref;
    setDelivery(item, 'pending', 'Sending…');
    pending.set(ref, item);
    lastTypingSent = 0; // the message ended the typing others were shown
    input.value = '';
    updateSendButton();
    input.focus();
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });

  // Enter sends, Shift+Enter is a new line; Enter that ends an IME
  // composition (Chinese, Japanese, ...) only confirms the composed text.
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  input.addEventListener('input', () => {
    updateSendButton();
    const now = Date.now();
    if (isOpen() && input.value !== '' && now - lastTypingSent >= TYPING_SEND_MS) {
      lastTypingSent = now;
      socket.send(JSON.stringify({ type: 'typing' }));
    }
  });

  nameForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = nameInput.value.trim();
    if (name === '') {
      nameNote.textContent = 'A name needs at least one character';
      return;
    }
    nameNote.textContent = '';
    if (isOpen()) {
      // Remembered once the server takes it (its `name` event).
      if (name === nameOf(myId)) {
        storeName(name);
      } else {
        renaming = true;
        socket.send(JSON.stringify({ type: 'name', name }));
      }
    } else {
      storeName(name); // sent as ?name= on the next connect
    }
    input.focus();
  });

  roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const next = roomInput.value.trim();
    if (!ROOM_NAME.test(next)) {
      roomNote.textContent = 'Room names are 1–64 letters, digits, dots, dashes or underscores';
      return;
    }
    roomNote.textContent = '';
    roomInput.value = '';
    // The address says where we are, so it can be bookmarked or shared.
    if (window.location.pathname.startsWith('/r/')) {
      window.history.pushState(null, '', `/r/${next}`);
    } else {
      window.history.pushState(null, '', `#${next}`);
    }
    switchRoom(next);
    input.focus();
  });

  // The back button, or a #room edited by hand.
  window.addEventListener('popstate', () => switchRoom(roomFromLocation()));
  window.addEventListener('hashchange', () => switchRoom(roomFromLocation()));

  // Whether the reader was at the end when the log last scrolled: when the
  // log then shrinks (the composer grows a line, a phone's keyboard opens),
  // the end stays in view instead of sliding under the composer.
  let pinnedToBottom = true;
  messageList.addEventListener('scroll', () => {
    pinnedToBottom = isScrolledToBottom();
    if (pinnedToBottom) {
      newMessagesButton.hidden = true;
    }
  });
  if (window.ResizeObserver) {
    new ResizeObserver(() => {
      if (pinnedToBottom) {
        messageList.scrollTop = messageList.scrollHeight;
      }
    }).observe(messageList);
  }
  newMessagesButton.addEventListener('click', () => {
    scrollToBottom();
    input.focus();
  });

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      unread = 0;
      document.title = titleText();
    }
  });

  // Back online (laptop lid, phone leaving a tunnel): try now, not after the backoff.
  window.addEventListener('online', () => {
    if (retryTimer !== null) {
      window.clearTimeout(retryTimer);
      retryTimer = null;
      connect();
    }
  });

  if (storedName()) {
    nameInput.value = storedName();
  }
  showRoom();
  setStatus('idle');
  connect();
  input.focus();
})();
