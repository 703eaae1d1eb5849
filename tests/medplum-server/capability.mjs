// The CapabilityStatement of peersync's Medplum test server: what @medplum/fhir-router on its in-memory repository
// really does, which is close to, but not the same as, what Medplum's hosted server publishes (Medplum's own
// statement is built in packages/server/src/fhir/metadata.ts; differences are noted below and in README.md).

import { MEDPLUM_VERSION, getAllDataTypes, getSearchParameters, isResourceType } from '@medplum/core';

// Medplum's transaction rules (FhirRouter's batch processor), stated for people; FHIR R4 has no element for them.
const TRANSACTION_RULES =
  'Transactions are atomic. A transaction that holds a conditional create, update or delete needs strict isolation ' +
  'and is refused (400) above 8 entries; a transaction with more than 50 update entries is refused (400). ' +
  'Bundle-local references (urn:uuid fullUrls) are resolved; conditional references (Type?search) inside a bundle ' +
  'are neither resolved nor rejected: they are stored as written.';

// What the router routes per type (FhirRouter's route table) on a repository that keeps versions and history.
const TYPE_INTERACTIONS = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];

// Search result parameters the in-memory repository applies (it ignores _summary and _elements).
const RESULT_PARAMETERS = [
  { name: '_count', definition: 'https://hl7.org/fhir/R4/search.html#count', type: 'number' },
  { name: '_offset', definition: 'https://hl7.org/fhir/R4/search.html#count', type: 'number' },
  { name: '_sort', definition: 'https://hl7.org/fhir/R4/search.html#sort', type: 'string' },
];

function typeSearchParameters(resourceType) {
  const parameters = getSearchParameters(resourceType);
  if (!parameters) {
    return undefined;
  }
  return Object.values(parameters).map((p) => ({ name: p.code, definition: p.url, type: p.type }));
}

function resourceEntry(resourceType, typeSchema) {
  return {
    type: resourceType,
    profile: typeSchema.url,
    interaction: TYPE_INTERACTIONS.map((code) => ({ code })),
    // If-Match is honoured on update (412 on a stale version); a version is kept per write.
    versioning: 'versioned-update',
    readHistory: true,
    // PUT Type/{id} for an id the repository does not hold creates it (Medplum's hosted server says false).
    updateCreate: true,
    conditionalCreate: true,
    conditionalUpdate: true,
    conditionalRead: 'not-supported',
    conditionalDelete: 'single',
    // Literal and bundle-local references; never checked for existence, conditional references not resolved.
    referencePolicy: ['literal', 'local'],
    searchParam: typeSearchParameters(resourceType),
  };
}

/** The statement served at {base}/metadata. */
export function buildCapabilityStatement(baseUrl) {
  const resources = Object.entries(getAllDataTypes())
    .filter(
      ([name, schema]) =>
        isResourceType(name) && schema.url?.startsWith('http://hl7.org/fhir/StructureDefinition/')
    )
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([name, schema]) => resourceEntry(name, schema));
  return {
    resourceType: 'CapabilityStatement',
    id: 'peersync-medplum-test-server',
    name: 'PeersyncMedplumTestServer',
    title: "Medplum's FHIR engine (in-memory) for peersync's tests",
    status: 'active',
    date: new Date().toISOString(),
    publisher: 'peersync tests',
    description: `@medplum/fhir-router ${MEDPLUM_VERSION} on a MemoryRepository, behind tests/medplum-server/server.mjs.`,
    kind: 'instance',
    software: { name: 'medplum-fhir-router', version: MEDPLUM_VERSION },
    implementation: { description: 'peersync Medplum test server', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    patchFormat: ['application/json-patch+json'],
    rest: [
      {
        mode: 'server',
        documentation: TRANSACTION_RULES,
        resource: resources,
        interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }],
        searchParam: RESULT_PARAMETERS,
      },
    ],
  };
}
