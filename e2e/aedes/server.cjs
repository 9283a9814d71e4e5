// aedes on 127.0.0.1:PORT for Kiln's tests: `node server.cjs PORT`. Retained messages
// live in memory: a restart forgets them, like a mosquitto without persistence.
const net = require('net');
const { Aedes } = require('aedes');

(async () => {
  const broker = await Aedes.createBroker();
  const server = net.createServer(broker.handle);
  server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('aedes listening'));
})();
