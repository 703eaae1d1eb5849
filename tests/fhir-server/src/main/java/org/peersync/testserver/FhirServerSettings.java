package org.peersync.testserver;

import ca.uhn.fhir.jpa.api.config.JpaStorageSettings.ClientIdStrategyEnum;
import org.springframework.boot.context.properties.ConfigurationProperties;

/**
 * Our own small set of switches, bound from {@code peersync.fhir.*} (application.yaml, program
 * arguments, system properties or environment variables such as
 * {@code PEERSYNC_FHIR_VALIDATE_REQUESTS=true}).
 */
@ConfigurationProperties(prefix = "peersync.fhir")
public class FhirServerSettings {

	/** ALPHANUMERIC (HAPI default) or ANY; with ANY the server assigns UUIDs. */
	private ClientIdStrategyEnum clientIdStrategy = ClientIdStrategyEnum.ALPHANUMERIC;

	private boolean allowMultipleDelete = true;
	private boolean allowExternalReferences = true;
	private boolean enforceReferentialIntegrityOnWrite = true;
	private boolean enforceReferentialIntegrityOnDelete = true;
	private boolean expungeEnabled = true;
	private boolean deleteExpungeEnabled = true;
	/** Milliseconds a search result set may be reused for an identical search; 0 or less = never. */
	private long reuseCachedSearchResultsMillis = 0;
	private boolean suppressUpdatesWithNoChange = true;
	/** Registers the CascadingDeleteInterceptor (only acts on {@code DELETE ...?_cascade=delete}). */
	private boolean allowCascadingDeletes = true;
	private int defaultPageSize = 20;
	private int maxPageSize = 500;
	/** One log line per request (logger {@code fhirtest.access}). */
	private boolean logRequests = true;

	private final Validate validate = new Validate();
	private final Auth auth = new Auth();

	/**
	 * SMART enforcement ({@link SmartScopeInterceptor}): on when {@code jwks-url} is set, off by default.
	 * server.sh sets these from PEERSYNC_FHIR_AUTH_JWKS_URL, _ISSUER, _AUDIENCE and _TOKEN_URL.
	 */
	public static class Auth {
		/** The authorization server's JWK Set (the keys that sign access tokens). */
		private String jwksUrl = "";
		/** The required {@code iss} of access tokens. */
		private String issuer = "";
		/** The required {@code aud}; empty = not checked. */
		private String audience = "";
		/** Published as token_endpoint in /fhir/.well-known/smart-configuration; empty = not published. */
		private String tokenUrl = "";

		public boolean isEnabled() {
			return jwksUrl != null && !jwksUrl.isBlank();
		}

		public String getJwksUrl() {
			return jwksUrl;
		}

		public void setJwksUrl(String theValue) {
			jwksUrl = theValue;
		}

		public String getIssuer() {
			return issuer;
		}

		public void setIssuer(String theValue) {
			issuer = theValue;
		}

		public String getAudience() {
			return audience;
		}

		public void setAudience(String theValue) {
			audience = theValue;
		}

		public String getTokenUrl() {
			return tokenUrl;
		}

		public void setTokenUrl(String theValue) {
			tokenUrl = theValue;
		}
	}

	public static class Validate {
		/** Validate every incoming resource; reject the request on an ERROR issue. */
		private boolean requests = false;

		public boolean isRequests() {
			return requests;
		}

		public void setRequests(boolean theRequests) {
			requests = theRequests;
		}
	}

	public ClientIdStrategyEnum getClientIdStrategy() {
		return clientIdStrategy;
	}

	public void setClientIdStrategy(ClientIdStrategyEnum theClientIdStrategy) {
		clientIdStrategy = theClientIdStrategy;
	}

	public boolean isAllowMultipleDelete() {
		return allowMultipleDelete;
	}

	public void setAllowMultipleDelete(boolean theAllowMultipleDelete) {
		allowMultipleDelete = theAllowMultipleDelete;
	}

	public boolean isAllowExternalReferences() {
		return allowExternalReferences;
	}

	public void setAllowExternalReferences(boolean theAllowExternalReferences) {
		allowExternalReferences = theAllowExternalReferences;
	}

	public boolean isEnforceReferentialIntegrityOnWrite() {
		return enforceReferentialIntegrityOnWrite;
	}

	public void setEnforceReferentialIntegrityOnWrite(boolean theValue) {
		enforceReferentialIntegrityOnWrite = theValue;
	}

	public boolean isEnforceReferentialIntegrityOnDelete() {
		return enforceReferentialIntegrityOnDelete;
	}

	public void setEnforceReferentialIntegrityOnDelete(boolean theValue) {
		enforceReferentialIntegrityOnDelete = theValue;
	}

	public boolean isExpungeEnabled() {
		return expungeEnabled;
	}

	public void setExpungeEnabled(boolean theExpungeEnabled) {
		expungeEnabled = theExpungeEnabled;
	}

	public boolean isDeleteExpungeEnabled() {
		return deleteExpungeEnabled;
	}

	public void setDeleteExpungeEnabled(boolean theDeleteExpungeEnabled) {
		deleteExpungeEnabled = theDeleteExpungeEnabled;
	}

	public long getReuseCachedSearchResultsMillis() {
		return reuseCachedSearchResultsMillis;
	}

	public void setReuseCachedSearchResultsMillis(long theMillis) {
		reuseCachedSearchResultsMillis = theMillis;
	}

	public boolean isSuppressUpdatesWithNoChange() {
		return suppressUpdatesWithNoChange;
	}

	public void setSuppressUpdatesWithNoChange(boolean theValue) {
		suppressUpdatesWithNoChange = theValue;
	}

	public boolean isAllowCascadingDeletes() {
		return allowCascadingDeletes;
	}

	public void setAllowCascadingDeletes(boolean theAllowCascadingDeletes) {
		allowCascadingDeletes = theAllowCascadingDeletes;
	}

	public int getDefaultPageSize() {
		return defaultPageSize;
	}

	public void setDefaultPageSize(int theDefaultPageSize) {
		defaultPageSize = theDefaultPageSize;
	}

	public int getMaxPageSize() {
		return maxPageSize;
	}

	public void setMaxPageSize(int theMaxPageSize) {
		maxPageSize = theMaxPageSize;
	}

	public boolean isLogRequests() {
		return logRequests;
	}

	public void setLogRequests(boolean theLogRequests) {
		logRequests = theLogRequests;
	}

	public Validate getValidate() {
		return validate;
	}

	public Auth getAuth() {
		return auth;
	}
}
